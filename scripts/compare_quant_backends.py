"""Compare NF4 / int8 weight-only backends for a frozen linear stack with LoRA on top (CPU), one backend a run.

A SmolLM2-135M-sized stack (30 blocks of q, k, v, o, gate, up, down; 576 / 1536 wide), rank-8 LoRA on every
linear, 512 rows a step, AdamW on A/B. Prints relative dequantization error, median step time, packed weight
bytes and peak RSS. torchao is not a lorakit dependency: ``pip install torchao==0.18.0`` to compare it.

    for b in fp32 torchao-nf4 torchao-int8 bnb-nf4 bnb-int8 lorakit-nf4 lorakit-int8; do
        OMP_NUM_THREADS=1 python scripts/compare_quant_backends.py $b; done
"""

import json
import logging
import resource
import sys
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

torch.manual_seed(0)
H, FF, L, R = 576, 1536, 30, 8
SHAPES = {"q": (H, H), "k": (192, H), "v": (192, H), "o": (H, H), "gate": (FF, H), "up": (FF, H), "down": (H, FF)}


class Lora(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        out_f, in_f = SHAPES[base._name]
        self.A = nn.Parameter(torch.randn(R, in_f) * 0.01)
        self.B = nn.Parameter(torch.randn(out_f, R) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * 2.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for n, (o, i) in SHAPES.items():
            lin = nn.Linear(i, o, bias=False)
            lin._name = n
            setattr(self, n, lin)

    def forward(self, h):
        a = self.o(self.q(h)) + 0.0 * (self.k(h).sum() + self.v(h).sum())
        return h + 0.1 * a + 0.1 * self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def build():
    return nn.Sequential(*[Block() for _ in range(L)])


def quantize(model, backend):
    errs = []
    for blk in model:
        for n in SHAPES:
            lin = getattr(blk, n)
            w = lin.weight.detach().clone()
            if backend == "fp32":
                new = lin
                deq = w
            elif backend == "torchao-nf4":

                from torchao.quantization import to_nf4

                nsc = w.numel() // 64
                sb = max(d for d in range(1, 257) if nsc % d == 0)
                lin.weight = nn.Parameter(to_nf4(w, 64, sb), requires_grad=False)
                new = lin
                deq = lin.weight.get_original_weight()
            elif backend == "torchao-int8":
                from torchao.quantization import Int8WeightOnlyConfig, quantize_

                quantize_(lin, Int8WeightOnlyConfig())
                new = lin
                deq = lin.weight.dequantize()
            elif backend == "bnb-nf4":
                import bitsandbytes as bnb

                new = bnb.nn.Linear4bit(
                    w.shape[1], w.shape[0], bias=False, quant_type="nf4", compute_dtype=torch.float32
                )
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
                new = new.to("cpu")
                deq = bnb.functional.dequantize_4bit(new.weight.data, new.weight.quant_state)
            elif backend == "bnb-int8":
                import bitsandbytes as bnb

                new = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=0.0)
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                new = new.to("cpu")
                deq = new.weight.data.float() * new.weight.SCB.float()[:, None] / 127
            elif backend.startswith("lorakit-"):
                from lorakit.quant.linear import QuantizedLinear

                new = QuantizedLinear(lin, backend.split("-")[1])
                deq = new.dequantize()
            new._name = n
            lin.weight.requires_grad_(False) if backend in ("fp32",) else None
            errs.append(((deq.float() - w).norm() / w.norm()).item())
            setattr(blk, n, Lora(new))
    return sum(errs) / len(errs)


def weight_bytes(model):
    seen = 0
    for name, t in list(model.state_dict(keep_vars=True).items()):
        if ".A" in name[-2:] or ".B" in name[-2:]:
            continue
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = t.__tensor_flatten__()
            seen += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            seen += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            seen += qs.absmax.numel() * qs.absmax.element_size()
        scb = getattr(t, "SCB", None)
        if scb is not None:
            seen += scb.numel() * scb.element_size()
    return seen


def main(backend):
    t0 = time.time()
    model = build()
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    err = quantize(model, backend)
    t_quant = time.time() - t0
    params = [p for n, p in model.named_parameters() if n.endswith(".A") or n.endswith(".B")]
    assert all(not p.requires_grad for n, p in model.named_parameters() if not (n.endswith(".A") or n.endswith(".B")))
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(8 * 64, H)
    times = []
    for _step in range(8):
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    all(p.grad is None for p in params)  # zero_grad set to None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "backend": backend,
                "rel_err": err,
                "step_s": sorted(times[2:])[len(times[2:]) // 2],
                "weight_MB": weight_bytes(model) / 1e6,
                "fp32_weight_MB": fp32_bytes / 1e6,
                "peak_rss_MB": rss,
                "build_quant_s": t_quant,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
