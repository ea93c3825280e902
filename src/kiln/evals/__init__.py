"""Downstream evaluation: multiple-choice tasks (:mod:`kiln.evals.tasks`) scored offline."""
