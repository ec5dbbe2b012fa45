"""Max error of every from-scratch layer against its declared reference, per dtype.

For each registry entry whose conformance declaration names a reference (torch's layer, or a
float64 formula written for the entry), runs the declaration's inputs through both in train and
eval mode (the conformance suite's own ``_build``/``_run``: same parameters, same incoming
gradient) and writes the largest absolute difference of the outputs and of the gradients (input
and parameters) in float64 and float32 to reports/parity/parity.md.
    python scripts/parity_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import normzoo
from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.provenance import git_revision, now_utc
from normzoo.registry import get_norm
from normzoo.testing.conformance import _build, _inputs, _randomise, _run, conformance_of


def max_errors(name: str, dtype: torch.dtype) -> tuple[float, float] | None:
    spec, decl = get_norm(name), conformance_of(name)
    if decl.reference is None:
        return None
    ours = _build(spec, decl, spec.name)
    _randomise(ours)
    theirs = _build(spec, decl, decl.reference)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    out_err = grad_err = 0.0
    for mode in decl.modes:
        for x in _inputs(decl):
            a, b = _run(ours, x.to(dtype), mode), _run(theirs, x.to(dtype), mode)
            out_err = max(out_err, (a[0] - b[0]).abs().max().item())
            for u, v in zip(a[1:], b[1:], strict=True):
                grad_err = max(grad_err, (u - v).abs().max().item() if u.numel() else 0.0)
    return out_err, grad_err


def main() -> int:
    rows = []
    for name in normzoo.list_norms():
        spec = get_norm(name)
        if spec.name.startswith("native_") or spec.name == "none":
            continue
        got = {dt: max_errors(name, dt) for dt in (torch.float64, torch.float32)}
        if got[torch.float64] is None:
            rows.append([spec.display, "-", "(no reference declared)", "", "", ""])
            continue
        ref = conformance_of(name).reference
        ref_name = ref if isinstance(ref, str) else "formula in the entry's tests"
        cells = [f"{got[dt][i]:.1e}" for dt in (torch.float64, torch.float32) for i in (0, 1)]
        rows.append([spec.display, f"`{ref_name}`", *cells])
    header = ["layer", "reference", "float64 output", "float64 grads", "float32 output",
              "float32 grads"]  # fmt: skip
    text = "\n".join(
        [
            "# Parity of every layer with its reference: max absolute error",
            "",
            f"`python scripts/parity_table.py`, {now_utc()}, revision {git_revision(short=True)},",
            f"torch {torch.__version__}. Inputs and modes (train and eval) of each entry's conformance",
            "declaration (`normzoo.testing`); grads: the input's and every parameter's for one fixed",
            "incoming gradient. The conformance suite asserts the float64 column within 1e-10 (or the",
            "entry's declared tolerance); a reference written as a formula is in the entry's tests.",
            "",
            md_table(header, rows),
            "",
        ]
    )
    out = Path("reports/parity/parity.md")
    write_text_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
