"""End to end on a GPU: ``hessfast.lanczos(m=100)`` at real shapes, each as a multiple of one gradient.

Workloads (synthetic data of the real shapes; random weights, eval-mode batch norm):

* VGG-16 (batch norm) on CIFAR-100 shapes, N = 10,000 images in batches of 500, P = 14.8 M; the time
  is also projected to the paper's full data (45,000 images: products scale with N);
* ResNet-18 (the CIFAR variant: 3x3 stem, no max-pool) on CIFAR-10 shapes, N = 5,000, P = 11.2 M;
* a GPT-2-small-sized transformer (12 layers, width 768, 12 heads, vocabulary 50,257; P = 124 M) on
  256 sequences of 64 tokens in batches of 32, causal LM loss (``hessfast.losses.causal_lm``).

Runs per workload: eager (``hvp_mode="auto"``: double backward through the cached graph), compiled
(``compile=True``: forward-over-reverse through ``torch.compile``; compile time reported apart), and
4 probes in lockstep (``num_probes=4, lockstep=True``) in forward mode (one vmapped product per step)
and through the cached graph (one batched backward per step, ``batched_backward``, the CUDA default),
against the same 4 probes one after the other. Every run is timed with CUDA synchronised; ``x grad``
is the Lanczos time (compilation excluded) over one gradient over the same data.

Budget: the whole script must stay under ``--budget`` seconds (default 230, for the 4 minutes
``bench/gpu_check.sh`` gives it). Before each run it times one product and, where m = 100 would not
fit in that run's share of the time left (the compiled run, last, keeps ``MIN_COMPILE_S`` of each
workload's share for itself), runs fewer steps and projects the m = 100 time linearly (marked "projected" in the table). A run that fails (memory, compiler) is a row saying why.

    python bench/gpu_e2e.py [--device cuda] [--budget 230] [--only vgg16 resnet18 gpt2] [--save FILE]
    python bench/gpu_e2e.py --device cpu --tiny --compile-backend aot_eager   # smoke test of this script
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _common import environment  # noqa: I001 (puts the source tree on sys.path)

import hessfast
from hessfast.harness.models import vgg16_bn
from hessfast.operators import CurvatureOperator, compiled


# ---------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 x 32 images (He et al.'s CIFAR variant of the ImageNet network)."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-shaped decoder (pre-norm blocks, learned positions, output tied to the token embedding)."""

    def __init__(self, vocab: int = 50257, layers: int = 12, d: int = 768, heads: int = 12, ctx: int = 1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.T


# ---------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    batches: Callable[[torch.device], list]
    loss_fn: object = None
    full_n: int = 0          # project the eager run to this many samples (0: no projection)
    probes: int = 4          # probes of the lockstep rows (the k bases must fit in device memory)


def images(n, batch, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(min(batch, n - i), 3, 32, 32, generator=g).to(device),
             torch.randint(0, classes, (min(batch, n - i),), generator=g).to(device)) for i in range(0, n, batch)]


def tokens(n, batch, t, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        ids = torch.randint(0, vocab, (min(batch, n - i), t), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def workloads(tiny: bool) -> dict:
    if tiny:   # the script's own smoke test on a CPU: same code paths, small shapes
        return {"vgg16": Workload("VGG-16-bn (width 1/16) CIFAR-100", lambda: vgg16_bn(100, width=1 / 16),
                                  lambda d: images(64, 32, 100, d), full_n=288),
                "resnet18": Workload("ResNet-18 (width 4) CIFAR-10", lambda: ResNet18(10, width=4),
                                     lambda d: images(64, 32, 10, d)),
                "gpt2": Workload("GPT (2 x 32, vocab 101)", lambda: GPT(101, 2, 32, 2, 16),
                                 lambda d: tokens(16, 8, 8, 101, d), hessfast.losses.causal_lm())}
    return {"vgg16": Workload("VGG-16-bn CIFAR-100 (N=10,000)", lambda: vgg16_bn(100),
                              lambda d: images(10_000, 500, 100, d), full_n=45_000),
            "resnet18": Workload("ResNet-18 CIFAR-10 (N=5,000)", ResNet18, lambda d: images(5_000, 500, 10, d)),
            "gpt2": Workload("GPT-2-small size (256 x 64 tokens)", GPT, lambda d: tokens(256, 32, 64, 50257, d),
                             hessfast.losses.causal_lm(), probes=2)}


# ---------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def batch_loss_sum(model, batch):
    """The summed loss terms of a batch and their number (next-token for token batches)."""
    if isinstance(batch, dict):
        logits, labels = model(batch["input_ids"])[:, :-1], batch["labels"][:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"), labels.numel()
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum"), len(y)


def gradient_time(model, batches, device) -> float:
    """Best of 3 gradients of the mean loss over all batches (the unit of every ratio), batch norm in eval
    mode as in hessfast's products."""
    training = model.training
    model.eval()
    terms = sum(b["labels"][:, 1:].numel() if isinstance(b, dict) else len(b[1]) for b in batches)

    def grad():
        model.zero_grad(set_to_none=True)
        for batch in batches:
            (batch_loss_sum(model, batch)[0] / terms).backward()

    timed(grad, device)
    best = min(timed(grad, device)[0] for _ in range(3))
    model.zero_grad(set_to_none=True)
    model.train(training)
    return best


MIN_COMPILE_S = 45   # a compiled run starts only with this much of its workload's time left (compiling
# a CNN's forward-over-reverse product took 30-50 s on CPU at small widths; it cannot be budgeted exactly)
RUNS = [  # label, operator keywords, lanczos keywords, probes (None: the workload's); compiled last (its
    # compile time cannot be budgeted in advance, so it runs on what the eager runs leave, at least MIN_COMPILE_S)
    ("eager (auto)", {}, {}, 1),
    ("probes, sequential, forward", {"hvp_mode": "forward"}, {"lockstep": False}, None),
    ("probes, lockstep, forward", {"hvp_mode": "forward"}, {"lockstep": True}, None),
    ("probes, lockstep, cached graph", {}, {"lockstep": True}, None),   # one batched backward per step
    ("compiled", {"compile": True}, {}, 1),
]


def one_run(model, batches, wl, device, label, op_kw, lz_kw, probes, m, seconds_left, grad_t):
    """Build the operator, time one product, pick the steps that fit, run; a table row."""
    row = {"run": label, "probes": probes}
    build_t, op = timed(lambda: CurvatureOperator(model, batches, loss_fn=wl.loss_fn, **op_kw), device)
    meta = op.meta()
    comp = meta.get("compile_s", 0.0)
    row.update(compile_s=comp, build_s=build_t - comp, hvp=meta["hvp_mode"], cached=meta["cached"],
               compiled=meta.get("compiled", False), fallback=meta.get("compile_fallback"))
    P = op.P
    V = torch.randn(probes, P, device=device, dtype=op.dtype)
    if lz_kw.get("lockstep"):   # one batched product for all probes (the second call: the first warms up)
        prod_t = [timed(lambda: op.matmat(V), device)[0] for _ in range(2)][1]
    else:                       # one product per probe and step
        prod_t = probes * [timed(lambda: op.matvec(V[0]), device)[0] for _ in range(2)][1]
    steps = max(2, min(m, int(0.8 * seconds_left / max(prod_t, 1e-6))))
    kw = dict(basis_dtype=torch.bfloat16) if P * (m + 1) * probes * 4 > 0.6 * _free(device) else {}
    loop_t, spec = timed(lambda: hessfast.lanczos(op, m=steps, num_probes=probes, seed=0, progress=False,
                                                  **kw, **lz_kw), device)
    scale = m / steps
    row.update(P=P, steps=steps, projected=steps < m, lanczos_s=loop_t * scale,
               x_grad=(build_t - comp + loop_t * scale) / grad_t, product_x=prod_t / grad_t / probes,
               lambda_max=spec.lambda_max, lockstep=spec.meta["lockstep"], basis=spec.meta["basis_dtype"])
    if wl.full_n:
        row["full_data_min"] = (build_t - comp + loop_t * scale) * wl.full_n / op.N / 60
    return row


def _free(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 64 * 2 ** 30


def run_workload(wl, device, m, deadline, with_compile=True) -> list:
    torch.manual_seed(0)
    model = wl.make().to(device)
    batches = wl.batches(device)
    grad_t = gradient_time(model, batches, device)
    rows = []
    # the compiled run (last) keeps MIN_COMPILE_S of the workload's time: the others share the rest
    reserve = MIN_COMPILE_S if with_compile else 0.0
    eager_runs = sum("compile" not in op_kw for _, op_kw, _, _ in RUNS)
    for i, (label, op_kw, lz_kw, probes) in enumerate(RUNS):
        if "compile" in op_kw:
            left = deadline - time.perf_counter()
        else:
            left = (deadline - time.perf_counter() - reserve) / (eager_runs - i)
        if left < 5 or ("compile" in op_kw and (not with_compile or left < MIN_COMPILE_S)):
            rows.append({"run": label, "note": "skipped: " + ("--no-compile" if not with_compile else "out of time")})
            continue
        probes = wl.probes if probes is None else probes
        label = label.replace("probes", f"{probes} probes", 1) if label.startswith("probes") else label
        try:
            row = one_run(model, batches, wl, device, label, op_kw, lz_kw, probes, m, left, grad_t)
        except Exception as err:  # noqa: BLE001 - a failing run is reported, not fatal
            row = {"run": label, "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        rows.append(row)
        print(f"  {label}: {row}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model, batches
    return [dict(r, workload=wl.name, gradient_ms=grad_t * 1e3) for r in rows]


def markdown(rows, env, m) -> str:
    out = [f"`{env['command']}`", "", ", ".join(f"{k}: {v}" for k, v in env.items() if k != "command"), "",
           f"| workload | gradient ms | run | hvp | steps | lanczos(m={m}) s | x gradient | product/vector x grad | "
           "compile s | full data (min) | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            out.append(f"| {r['workload']} | {r['gradient_ms']:.1f} | {r['run']} | | | | | | | | {r['note']} |")
            continue
        mode = r["hvp"] + ("+cache" if r["cached"] else "") + (" compiled" if r["compiled"] else "")
        note = ("projected from %d steps; " % r["steps"] if r["projected"] else "") + f"P={r['P']:,}"
        note += f"; basis {r['basis']}" + ("; lockstep" if r["lockstep"] else "")
        note += f"; fallback: {r['fallback'][:80]}" if r["fallback"] else ""
        full = f"{r['full_data_min']:.1f}" if "full_data_min" in r else ""
        out.append(f"| {r['workload']} | {r['gradient_ms']:.1f} | {r['run']} | {mode} | {r['steps']} | "
                   f"{r['lanczos_s']:.1f} | {r['x_grad']:.0f} | {r['product_x']:.2f} | {r['compile_s']:.1f} | {full} | "
                   f"{note} |")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--budget", type=float, default=230.0, help="seconds for the whole script")
    parser.add_argument("--only", nargs="*", default=None, choices=["vgg16", "resnet18", "gpt2"])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke test of this script)")
    parser.add_argument("--save", default=None, help="append the markdown table to this file")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; the CPU "
                                                                "smoke test uses aot_eager)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.compile_backend:
        compiled.COMPILE_BACKEND = args.compile_backend
    start = time.perf_counter()
    chosen = [(k, w) for k, w in workloads(args.tiny).items() if args.only is None or k in args.only]
    rows = []
    for i, (key, wl) in enumerate(chosen):
        share = (args.budget - (time.perf_counter() - start)) / (len(chosen) - i)
        print(f"{wl.name}: {share:.0f} s", flush=True)
        rows += run_workload(wl, device, args.m, time.perf_counter() + share, not args.no_compile)
        print(markdown(rows, environment(args.device), args.m), flush=True)   # what is done so far, if killed later
    table = markdown(rows, environment(args.device), args.m)
    print("\n" + table + f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.save:
        with open(args.save, "a") as f:
            f.write("\n### lanczos end to end on the GPU (bench/gpu_e2e.py)\n\n" + table)


if __name__ == "__main__":
    main()
