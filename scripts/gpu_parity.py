"""CUDA parity of every from-scratch layer with its native torch reference (``make gpu-check``).

For each registered layer that names a native reference: both built with the same state, on CUDA,
float32, a 4-D input (2-D for dense-only last-dim layers is left to the CPU suite); a weight
reparametrisation wraps a 3x3 conv built from one seed for both sides. Outputs, input gradients and
parameter gradients after 3 training steps, then eval outputs. Relative error
``max|a - b| / max|b|``; prints a markdown table; exit 1 if any layer exceeds 1e-4 (the CPU suite's
1e-5 float32 tolerance, with room for CUDA's reduction order). Also CPU-vs-CUDA of the same layer.
"""

from __future__ import annotations

import sys

import torch

import normzoo
from normzoo.registry import get_norm, list_norms

TOLERANCE = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def steps(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs, input and parameter gradients over 3 training steps, then the eval output."""
    out: list[torch.Tensor] = []
    layer.train()
    # a fixed random projection: the mean of squares of a normalised output has ~zero gradient
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * weight).sum().backward()
        out += [y, xi.grad, *[p.grad.clone() for p in layer.parameters() if p.grad is not None]]
        layer.zero_grad()
    layer.eval()
    with torch.no_grad():
        out.append(layer(x))
    return out


def main() -> int:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # cpu: a dry run of the script
    rows, worst = [], 0.0
    for name in list_norms():
        spec = get_norm(name)
        if spec.reference:
            continue
        kw = {"num_groups": 2} if "num_groups" in spec.options() else {}
        x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
        if spec.kind == "last_dim":
            x = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
        try:
            if spec.kind == "weight":  # both sides reparametrise the same conv
                ours = normzoo.build_norm(name, _conv(), **kw)
                ref = normzoo.build_norm(spec.native, _conv(), **kw) if spec.native else None
            else:
                ours = normzoo.build_norm(name, 8, **kw)
                ref = normzoo.build_norm(spec.native, 8, **kw) if spec.native else None
                if ref is not None:
                    ref.load_state_dict(ours.state_dict(), strict=False)
            cpu = steps(_copy(ours), x)
            a = steps(_copy(ours).to(dev), x.to(dev))
        except Exception as exc:  # a layer this script cannot drive: listed, not hidden
            rows.append(
                f"| {name} | {spec.native or '-'} | not run: {type(exc).__name__}: {exc} | |"
            )
            continue
        e_cpu = max(rel(u, v) for u, v in zip(a, cpu, strict=True))
        e_ref = None
        if ref is not None:
            b = steps(ref.to(dev), x.to(dev))
            e_ref = max(rel(u, v) for u, v in zip(a, b, strict=True))
        worst = max(worst, e_cpu, e_ref or 0.0)
        shown = "-" if e_ref is None else f"{e_ref:.1e}"
        rows.append(f"| {name} | {spec.native or '-'} | {shown} | {e_cpu:.1e} |")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu dry run"
    print(f"# CUDA parity ({where}, torch {torch.__version__})\n")
    print("| layer | reference | rel. error vs reference (CUDA) | rel. error CUDA vs CPU |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nworst {worst:.1e}, tolerance {TOLERANCE:.0e}: {'ok' if worst <= TOLERANCE else 'FAIL'}"
    )
    return 0 if worst <= TOLERANCE else 1


def _conv() -> torch.nn.Module:
    """The 3x3 conv a weight reparametrisation wraps, the same weights at every call."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(8, 8, 3, padding=1)


def _copy(layer: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(layer)


if __name__ == "__main__":
    sys.exit(main())
