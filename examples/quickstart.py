"""Train one small MLP with each optimlab optimizer and torch's AdamW, and print the final losses.

Run: python examples/quickstart.py   (a few seconds on a CPU)
"""

import torch

import optimlab


def train(make_optimizer, steps: int = 300, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x = torch.rand(512, 4) * 4 - 2
    y = torch.sin(x).sum(1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        schedule.step()
    return torch.nn.functional.mse_loss(model(x), y).item()


if __name__ == "__main__":
    print(f"{'torch AdamW':>24s}  final MSE {train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)):.4f}")
    settings = {"adan": 3e-2, "exadam": 3e-3, "diffgrad": 1e-2, "lion": 1e-3, "lionk": 1e-3}
    for name, lr in settings.items():
        print(f"{name:>24s}  final MSE {train(lambda m: optimlab.create(name, m, lr=lr)):.4f}")
    orthograd = train(lambda m: optimlab.create("orthograd", m, inner="adamw", lr=1e-2))
    print(f"{'orthograd(adamw)':>24s}  final MSE {orthograd:.4f}")
