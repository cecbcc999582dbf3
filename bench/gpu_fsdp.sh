#!/usr/bin/env bash
# FSDP2 on one GPU (world size 1, NCCL): products, Lanczos and bf16 compute of a fully_shard model (< 60 s).
#   bash bench/gpu_fsdp.sh                       lines on stdout, exit status 1 if a check fails
#   HESSFAST_FSDP_DEVICE=cpu bash bench/gpu_fsdp.sh   the same on the CPU with gloo (checks the script)
# Checks: H v of an MLP 64-256-256-10 (tanh) under fully_shard against the exact single-process product of
# the same weights in float64 (float32: relative <= 1e-3); lanczos(m=30) extremes against the exact run
# from the same probe (<= 2e-4 |lambda|_max); MixedPrecisionPolicy(bf16) extremes within 0.02
# |lambda|_max of float32, with meta["fd_noise"]; the shards bit for bit afterwards; product time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
PORT=$(( 29500 + RANDOM % 2000 ))
export MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT RANK=0 WORLD_SIZE=1 LOCAL_RANK=0
export HESSFAST_FSDP_DEVICE="${HESSFAST_FSDP_DEVICE:-cuda}"
timeout 120 "$PY" - <<'EOF'
import copy, os, sys, time
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
sys.path.insert(0, os.getcwd())
import hessfast
from hessfast import distributed as hd
from hessfast.operators.fsdp import FSDPOperator

want_cuda = os.environ["HESSFAST_FSDP_DEVICE"] == "cuda"
if want_cuda and not torch.cuda.is_available():
    print("gpu_fsdp: SKIPPED (no CUDA device; HESSFAST_FSDP_DEVICE=cpu runs it on the CPU)"); sys.exit(0)
ctx = hd.init_from_env(backend="nccl" if want_cuda else "gloo")
device = torch.device("cuda", 0) if want_cuda else torch.device("cpu")
print(f"gpu_fsdp: torch {torch.__version__}, device {torch.cuda.get_device_name(0) if want_cuda else 'cpu'}, "
      f"backend {torch.distributed.get_backend()}")
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
base = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
x, y = torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
data = [(x[i:i + 256].to(device), y[i:i + 256].to(device)) for i in range(0, 1024, 256)]
data64 = [(a.double(), b) for a, b in data]
ok = True

def check(name, value, limit):
    global ok
    ok &= value <= limit
    print(f"gpu_fsdp: {name} = {value:.3g} (limit {limit:g}) {'ok' if value <= limit else 'FAILED'}")

def shard(model, policy=None):
    model = copy.deepcopy(model).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **({} if policy is None else {"mp_policy": policy}))
    return fully_shard(model, **({} if policy is None else {"mp_policy": policy}))

exact_model = copy.deepcopy(base).double().to(device)
exact = hessfast.HessianOperator(exact_model, data64, distributed=False)
v = torch.randn(exact.P, generator=g, dtype=torch.float64).to(device)
want = exact.matvec(v)
ref = hessfast.lanczos(exact_model, data64, m=30, seed=0, progress=False, distributed=False).ritz_values
scale = float(abs(ref).max())
m32 = shard(base)
before = [p.to_local().clone() for p in m32.parameters()]
op = FSDPOperator(m32, data)
t = time.perf_counter(); hv = op.matvec(v.float()); t = time.perf_counter() - t
check("float32 H v relative error", float((hv.double() - want).norm() / want.norm()), 1e-3)
print(f"gpu_fsdp: first product (with the noise estimate) {t * 1e3:.1f} ms, P = {op.P:,}")
spec = hessfast.lanczos(m32, data, m=30, seed=0, progress=False)
check("float32 lambda_max error / |lambda|_max", abs(spec.ritz_values.max() - ref.max()) / scale, 2e-4)
check("float32 lambda_min error / |lambda|_max", abs(spec.ritz_values.min() - ref.min()) / scale, 2e-4)
print(f"gpu_fsdp: lanczos m=30 {spec.meta['elapsed']:.2f} s, basis {spec.meta['basis']}, "
      f"fd_noise {spec.meta['fd_noise']:.3g}")
check("shards changed (entries)", float(sum(int((p.to_local() != b).sum()) for p, b in zip(m32.parameters(), before))), 0)
m16 = shard(base, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
s16 = hessfast.lanczos(m16, data, m=30, seed=0, progress=False)
check("bf16 lambda_max - float32 / |lambda|_max", abs(s16.ritz_values.max() - spec.ritz_values.max()) / scale, 0.02)
print(f"gpu_fsdp: bf16 fd_noise {s16.meta['fd_noise']:.3g}, precision {s16.meta['fd_precision']}, "
      f"lanczos {s16.meta['elapsed']:.2f} s")
torch.distributed.destroy_process_group()
print("gpu_fsdp: " + ("ALL OK" if ok else "FAILED"))
sys.exit(0 if ok else 1)
EOF
