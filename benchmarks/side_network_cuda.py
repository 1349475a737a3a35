"""The side network's hand-written ladder backward and its trainer on a CUDA device.

A device check (the project runs on CPUs; this needs a GPU): ``gradcheck`` of
``ladder_path`` on the GPU, the same two-task fit on the CPU and the GPU (float64), and one
fit timed on each (float32, the CPU on one thread as the server runs).

    PYTHONPATH=. python benchmarks/side_network_cuda.py
"""

import sys
import time

import torch

from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig
from flower_pae.side_network.path import ladder_path

if not torch.cuda.is_available():
    sys.exit("no CUDA device: this check needs a GPU (the CPU tests cover the rest)")
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
dev = "cuda"

# 1. gradcheck of ladder_path on the GPU, float64
gen = torch.Generator().manual_seed(0)
L, b, d, r = 3, 5, 6, 3


def rand(*s):
    return torch.randn(*s, generator=gen, dtype=torch.float64).to(dev).requires_grad_()


x, mus, gates = rand(b, L, d), rand(L - 1), rand(L, r)
w1 = [rand(r, d) for _ in range(L)]
w2 = [rand(d, r) for _ in range(L)]
ok = torch.autograd.gradcheck(
    lambda x, m, g, *w: ladder_path(x, m, g, w[:L], w[L:]), (x, mus, gates, *w1, *w2)
)
print("gradcheck on cuda:", ok, flush=True)


# 2. the same 2-task fit on CPU and on the GPU, float64
def fit(device, dtype, samples=100, tasks=2):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(samples, 30, 576, generator=g, dtype=dtype)
    t = 0.1 * torch.randn(samples, 576, generator=g, dtype=dtype)
    net = LadderSideNetwork(30, 576, out_rank=16, dtype=dtype).to(device)
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=10, batch_size=64))
    acts, t = acts.to(device), t.to(device)
    for k in range(tasks):
        net.add_task(f"t{k}")
        tr.fit(acts, t)
    return net, tr, acts, t


cpu_net = fit("cpu", torch.float64)[0]
gpu_net = fit(dev, torch.float64)[0]
diff = max(
    (a.double() - b.cpu().double()).abs().max().item()
    for a, b in zip(cpu_net.state_dict().values(), gpu_net.state_dict().values(), strict=True)
    if a.is_floating_point() and a.numel()
)
print(f"2-task fit, float64: max |cpu - cuda| weight difference {diff:.2e}", flush=True)

# 3. one more 10-epoch fit, float32, timed (CPU on 1 thread, as the server runs)
torch.set_num_threads(1)
for device in ("cpu", dev):
    net, tr, acts, t = fit(device, torch.float32)
    times = []
    for _ in range(5):
        if device == dev:
            torch.cuda.synchronize()
        s = time.perf_counter()
        tr.fit(acts, t)
        if device == dev:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    print(
        f"{device}: 10-epoch fit, 100 samples, 2 tasks: best {min(times) * 1e3:.0f} ms", flush=True
    )
