"""1-bit Adam in one process: the spec's identities on the functional core, the phases against closed forms, the
simulator's bytes, checkpoints, and bad input (the real ranks are in test_onebit_adam_multiprocess.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

import optimlab
from optimlab.distributed.onebit_adam import (
    DEEPSPEED_FREEZE_STEP,
    OneBitAdam,
    from_grid,
    make_layout,
    message_bytes,
    register_onebit_adam,
    scaled_sign_,
    signed_scale,
    simulated_compressed_allreduce,
    to_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the compressor and CompressedAllreduce ---------------------------------------------------------------------------
def test_layout_pads_to_a_multiple_of_n_lcm_n_8() -> None:
    for n in (1, 2, 3, 4, 6, 8, 12):
        quantum = n * math.lcm(n, 8)
        layout = make_layout([1, quantum, quantum + 1, 0], n)
        assert layout.chunks == (quantum // n, quantum // n, 2 * quantum // n, 0)
        assert all(c % 8 == 0 for c in layout.chunks)  # every server chunk packs into whole bytes
    vectors = [torch.randn(2, d, generator=_gen(d)) for d in (5, 40, 1)]
    layout = make_layout([5, 40, 1], 3)
    grid = to_grid(vectors, layout)
    assert grid.shape == (2, 3, layout.columns)
    assert all(torch.equal(a, b) for a, b in zip(from_grid(grid, layout), vectors))
    # row j is server j's chunk of every tensor: tensor 1 (40 elements padded to 3 lcm(3, 8) = 72, chunks of 24)
    block = grid[:, 1, layout.offsets[1] : layout.offsets[1] + 24]
    assert torch.equal(block[:, :16], vectors[1][:, 24:40]) and not block[:, 16:].any()


def test_scaled_sign_preserves_the_norm_and_takes_sgn0_as_plus_one() -> None:
    n, numels = 2, [16, 48, 32]  # multiples of n lcm(n, 8) = 16: no padding
    layout = make_layout(numels, n)
    x = to_grid([torch.randn(d, generator=_gen(d), dtype=F64) for d in numels], layout)
    original = x.clone()
    error = torch.zeros_like(x)
    positive, scale = scaled_sign_(x, error, layout)
    compressed = signed_scale(positive, scale, layout)
    torch.testing.assert_close(compressed + error, original, rtol=0, atol=1e-15)  # e = x - C(x)
    for c, v in zip(from_grid(compressed, layout), from_grid(original, layout)):
        torch.testing.assert_close(c.norm(), v.norm(), rtol=1e-14, atol=0)  # ||C(x)|| = ||x||
        assert torch.equal(c.sign(), v.sign())
        assert torch.allclose(c.abs(), v.norm() / math.sqrt(v.numel()))
    zeros = to_grid([torch.zeros(16, dtype=F64)], make_layout([16], 2))
    positive, scale = scaled_sign_(zeros, torch.zeros_like(zeros), make_layout([16], 2))
    assert positive.all() and scale.eq(0).all()


def test_worker_and_server_errors_telescope() -> None:
    """Per worker, sum_t C(x_t) + e_T = sum_t m_t exactly (up to rounding); through the whole CompressedAllreduce,
    sum_t output_t = mean_i sum_t m_i,t - mean_i e_i,T - eps_T (the server chunks, laid out as the grid)."""
    n, numels, steps = 3, [50, 7, 24], 12
    layout = make_layout(numels, n)
    gen = _gen(0)
    worker_error = torch.zeros(n, n, layout.columns, dtype=F64)
    server_error = torch.zeros(n, 1, layout.columns, dtype=F64)
    inputs = outputs = 0
    for _ in range(steps):
        momenta = [torch.randn(n, d, generator=gen, dtype=F64) for d in numels]
        inputs = inputs + to_grid(momenta, layout)
        outputs = outputs + to_grid(simulated_compressed_allreduce(momenta, worker_error, server_error, layout), layout)
    assert worker_error.abs().amax() > 0.1 and server_error.abs().amax() > 0.01  # the check is not vacuous
    expected = inputs.mean(0) - worker_error.mean(0) - server_error.squeeze(1)
    # (the outputs are cropped to the tensors; the padding's share stays in the errors)
    torch.testing.assert_close(from_grid(outputs, layout), from_grid(expected, layout), rtol=0, atol=1e-12)

    # one worker's compressor alone: sum of its compressed messages plus its final error = sum of its inputs
    error, sent, received = torch.zeros(n, layout.columns, dtype=F64), 0, 0
    for _ in range(steps):
        x = to_grid([torch.randn(d, generator=gen, dtype=F64) for d in numels], layout)
        received = received + x
        positive, scale = scaled_sign_(x, error, layout)
        sent = sent + signed_scale(positive, scale, layout)
    torch.testing.assert_close(sent + error, received, rtol=0, atol=1e-12)


def test_two_worker_hand_example() -> None:
    layout = make_layout([16], 2)  # d = 16: no padding, server chunks of 8
    m1 = torch.ones(16, dtype=F64)  # scale 1
    m2 = torch.tensor([-3.0, 3.0] * 4 + [3.0] * 8, dtype=F64)  # scale 3
    worker_error, server_error = torch.zeros(2, 2, 8, dtype=F64), torch.zeros(2, 1, 8, dtype=F64)
    (out,) = simulated_compressed_allreduce([torch.stack([m1, m2])], worker_error, server_error, layout)
    # server 0 averages (1 - 3)/2 = -1 and (1 + 3)/2 = 2, alternating: r = sqrt((1 + 4)/2); server 1 averages 2
    r0 = math.sqrt(2.5)
    expected = torch.tensor([-r0, r0] * 4 + [2.0] * 8, dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    assert not worker_error.any()  # each worker's vector is a scaled sign already
    torch.testing.assert_close(server_error[0, 0], torch.tensor([-1 + r0, 2 - r0] * 4, dtype=F64))
    assert not server_error[1].any()

    # padding: d = 3 pads to 16 zeros that count in the scale and compress to +scale: output sqrt(3)/4 each
    layout = make_layout([3], 2)
    ones = torch.ones(2, 3, dtype=F64)
    (out,) = simulated_compressed_allreduce(
        [ones], torch.zeros(2, 2, 8, dtype=F64), torch.zeros(2, 1, 8, dtype=F64), layout
    )
    torch.testing.assert_close(out, torch.full((3,), math.sqrt(3) / 4, dtype=F64))


# -- the optimizer's phases --------------------------------------------------------------------------------------------
def _params(seed: int = 0, shapes=((4, 3), (5,), ())) -> list[torch.nn.Parameter]:
    gen = _gen(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]


def test_warmup_is_adam_without_bias_correction_after_a_lost_first_step_then_v_freezes() -> None:
    lr, (b1, b2), eps, wd, freeze = 0.01, (0.8, 0.9), 1e-6, 0.1, 5
    params = _params()
    opt = OneBitAdam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, freeze_step=freeze, workers=1)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    gen = _gen(1)
    for t in range(1, 10):
        grads = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        v_before = [opt.state[p]["exp_avg_sq"].clone() for p in params] if t > 1 else None
        opt.step()
        if t == 1:  # initialisation: nothing moves
            assert all(torch.equal(p, r) for p, r in zip(params, ref))
            assert all(not s.any() for p in params for s in opt.state[p].values())
            continue
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            if t <= freeze:
                v[i] = b2 * v[i] + (1 - b2) * g * g
            ref[i] = ref[i] - lr * (m[i] / (v[i].sqrt() + eps) + wd * ref[i])
        torch.testing.assert_close(list(params), ref, rtol=1e-13, atol=1e-13)
        if t > freeze:  # frozen: bit for bit
            assert all(torch.equal(opt.state[p]["exp_avg_sq"], vb) for p, vb in zip(params, v_before))
        assert opt.compressing == (t >= freeze)


def test_simulator_warmup_averages_and_compression_uses_local_momenta() -> None:
    n, freeze, steps = 3, 3, 7
    params, check = _params(2), _params(2)
    opt = OneBitAdam(params, lr=0.02, freeze_step=freeze, workers=n)
    ref = OneBitAdam(check, lr=0.02, freeze_step=freeze, workers=1)  # fed the mean, then the functions by hand
    d = sum(p.numel() for p in params)
    layout = make_layout([p.numel() for p in params], n)
    worker_error = torch.zeros(n, n, layout.columns, dtype=F64)
    server_error = torch.zeros(n, 1, layout.columns, dtype=F64)
    gen = _gen(3)
    for t in range(1, steps + 1):
        g = torch.randn(n, d, generator=gen, dtype=F64)
        opt.step(worker_grads=g)
        columns = g.split([p.numel() for p in check], dim=1)
        if t <= freeze:
            for p, c in zip(check, columns):
                p.grad = c.div(n).sum(0).view_as(p)
            ref.step()
        else:
            with torch.no_grad():
                momenta = [0.9 * ref.state[p]["exp_avg"].reshape(-1) + 0.1 * c for p, c in zip(check, columns)]
                agreed = simulated_compressed_allreduce(momenta, worker_error, server_error, layout)
                for p, m in zip(check, agreed):
                    ref.state[p]["exp_avg"].copy_(m.view_as(p))
                    p.sub_(0.02 * ref.state[p]["exp_avg"] / (ref.state[p]["exp_avg_sq"].sqrt() + 1e-8))
        torch.testing.assert_close(list(params), list(check), rtol=1e-12, atol=1e-12)
    assert worker_error.abs().amax() > 0


def test_simulator_bytes_are_at_least_16x_fewer_than_fp32_allreduce() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 16))
    d = sum(p.numel() for p in model.parameters())
    for n in (2, 4, 8):
        opt = OneBitAdam(model.parameters(), freeze_step=2, workers=n)
        g = torch.randn(n, d, generator=_gen(n))
        sent = []
        for _ in range(4):
            before = opt.bytes_sent
            opt.step(worker_grads=g)
            sent.append(opt.bytes_sent - before)
        assert sent[:2] == [0, 4 * d]  # initialisation; warm-up: a float32 all-reduce's input
        layout = make_layout([p.numel() for p in model.parameters()], n)
        assert sent[2] == sent[3] == sum(message_bytes(layout, 4))
        assert 4 * d / sent[3] >= 16, (n, 4 * d / sent[3])


def test_single_worker_skips_compression_unless_asked() -> None:
    a, b = _params(4), _params(4)
    plain = OneBitAdam(a, freeze_step=2, workers=1)
    compressed = OneBitAdam(b, freeze_step=2, workers=1, compress_single_worker=True)
    gen = _gen(5)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen, dtype=F64) for p in a]
        for ps in (a, b):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        plain.step(), compressed.step()
    assert plain.bytes_sent == 0 and compressed.bytes_sent > 0
    assert not all(torch.equal(x, y) for x, y in zip(a, b))  # 1-bit momentum differs from the exact one
    for p in b:  # the compressed momentum of a tensor is a scaled sign
        m = compressed.state[p]["exp_avg"].reshape(-1)
        assert torch.allclose(m.abs(), m.abs().amax().expand_as(m))


# -- checkpoints ----------------------------------------------------------------------------------------------------------
def _roundtrip(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_resets_the_errors_and_loads_at_any_world_size() -> None:
    d, gen = 4 * 3 + 5 + 1, _gen(6)
    grads = [torch.randn(2, d, generator=gen, dtype=F64) for _ in range(10)]
    params = _params(7)
    opt = OneBitAdam(params, lr=0.01, freeze_step=3, workers=2)
    for g in grads[:6]:
        opt.step(worker_grads=g)
    sd = _roundtrip(opt.state_dict())
    assert sd["optimlab"]["step"] == 6
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in sd["state"].values())  # no errors saved

    continued = [p.detach().clone() for p in params]
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = OneBitAdam(resumed_params, lr=0.5, freeze_step=50, workers=2)
    resumed.load_state_dict(sd)
    assert resumed.steps == 6 and resumed.freeze_step == 3 and resumed.compressing  # the checkpoint's values
    opt.load_state_dict(opt.state_dict())  # the same reset in the original
    for g in grads[6:]:
        opt.step(worker_grads=g)
        resumed.step(worker_grads=g)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    assert not all(torch.equal(p, q) for p, q in zip(params, continued))

    four = OneBitAdam(_params(7), freeze_step=3, workers=4)  # another world size: m and v are shared, errors reset
    four.load_state_dict(sd)
    four.step(worker_grads=torch.randn(4, d, generator=gen, dtype=F64))
    assert four.steps == 7


# -- bad input ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"freeze_step": 5, "betas": (1.0, 0.999)}, r"Invalid betas\[0\]"),
        ({"freeze_step": 5, "betas": (0.9, -0.1)}, r"Invalid betas\[1\]"),
        ({"freeze_step": 5, "eps": -1e-8}, "Invalid eps"),
        ({"freeze_step": 5, "lr": -1.0}, "Invalid lr"),
        ({"freeze_step": 1}, "Invalid freeze_step: 1; expected an integer >= 2"),
        ({"freeze_step": 2.5}, "Invalid freeze_step"),
        ({"freeze_step": True}, "Invalid freeze_step"),
        ({"freeze_step": 10, "total_steps": 100}, "Invalid total_steps: 100; expected None when freeze_step"),
        ({"total_steps": 0}, "Invalid total_steps"),
        ({"total_steps": 10, "warmup_fraction": 0.0}, "Invalid warmup_fraction"),
        ({"total_steps": 10, "warmup_fraction": 1.5}, "Invalid warmup_fraction"),
        ({"freeze_step": 5, "compress_single_worker": 1}, "Invalid compress_single_worker"),
        ({"freeze_step": 5, "workers": 0}, "Invalid workers"),
    ],
)
def test_invalid_arguments_raise_value_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        OneBitAdam(_params(), **kwargs)


def test_warm_up_length_from_total_steps_or_deepspeeds_default() -> None:
    assert OneBitAdam(_params(), total_steps=1000, workers=1).freeze_step == 200
    assert OneBitAdam(_params(), total_steps=1000, warmup_fraction=0.15, workers=1).freeze_step == 150
    assert OneBitAdam(_params(), total_steps=3, workers=1).freeze_step == 2  # at least one warm-up step
    assert OneBitAdam(_params(), freeze_step=23000, workers=1).freeze_step == 23000
    with pytest.warns(UserWarning, match="DeepSpeed's default"):
        assert OneBitAdam(_params(), workers=1).freeze_step == DEEPSPEED_FREEZE_STEP


def test_missing_process_group_and_misuse() -> None:
    params = _params()
    opt = OneBitAdam(params, freeze_step=3)  # real ranks: the group is looked up at the first step
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        opt.step()
    with pytest.raises(TypeError, match="worker_grads is for the simulator"):
        opt.step(worker_grads=torch.zeros(1, 18))
    sim = OneBitAdam(_params(), freeze_step=3, workers=2)
    with pytest.raises(TypeError, match=r"needs step\(worker_grads=G\)"):
        sim.step()
    with pytest.raises(ValueError, match=r"expected \(2, 18\)"):  # a world-size mismatch
        sim.step(worker_grads=torch.zeros(3, 18, dtype=F64))
    with pytest.raises(TypeError, match="not the simulator"):
        register_onebit_adam(torch.nn.Linear(2, 2), sim)
    with pytest.raises(RuntimeError, match="no Communicator"):
        _ = sim.comm
    with pytest.raises(ValueError, match="not both"):
        OneBitAdam(_params(), freeze_step=3, workers=2, comm=object())


def test_changing_the_parameter_set_during_compression_is_refused() -> None:
    params = _params()
    opt = OneBitAdam(params, freeze_step=2, workers=1, compress_single_worker=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    params[1].grad = None
    with pytest.raises(RuntimeError, match="parameters with gradients changed"):
        opt.step()


def test_registry_entry() -> None:
    info = optimlab.get("onebit_adam")
    assert info.cls is OneBitAdam and info.kind == "optimizer" and info.arxiv == "2102.02888"
    assert "1-bit Adam" in info.paper and "DeepSpeed" in info.code_url
    defaults = info.defaults
    assert defaults["lr"] == 1e-3 and defaults["betas"] == (0.9, 0.999) and defaults["eps"] == 1e-8
    assert defaults["weight_decay"] == 0.0 and defaults["compress_single_worker"] is False


def test_low_precision_parameters_keep_their_errors_through_compression() -> None:
    """bfloat16 parameters step in float32 copies made afresh at every step; the error buffers belong to the
    parameters, not to the copies (keyed by the copies, the second compressed step raised 'parameters changed')."""
    params = [torch.nn.Parameter(torch.randn(s, generator=_gen(8), dtype=torch.bfloat16)) for s in ((6, 5), (7,))]
    opt = OneBitAdam(params, lr=0.01, freeze_step=2, workers=2)
    gen = _gen(9)
    for _ in range(6):
        before = [p.detach().clone() for p in params]
        opt.step(worker_grads=torch.randn(2, 37, generator=gen, dtype=torch.bfloat16))
        assert all(p.dtype == torch.bfloat16 for p in params)
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
    errors = opt._errors[2]
    assert errors[0].dtype == torch.float32 and errors[0].abs().amax() > 0  # the errors compensate, in float32


def _dead_entry_run(steps: int, groups: list[dict] | None = None) -> tuple[torch.Tensor, OneBitAdam]:
    """Two simulated workers on a vector whose entry 0 never gets a gradient (a dead unit): 4 warm-up steps, then
    compressed ones. Returns the vector and the optimizer."""
    p = torch.nn.Parameter(torch.ones(16, dtype=F64))
    opt = OneBitAdam([{"params": [p], **(groups or [{}])[0]}], lr=1e-3, freeze_step=4, workers=2)
    gen = _gen(5)
    for _ in range(steps):
        g = torch.randn(2, 16, generator=gen, dtype=F64)
        g[:, 0] = 0.0
        opt.step(worker_grads=g)
    return p, opt


def test_entries_without_warm_up_gradients_blow_up_unless_masked() -> None:
    """The scaled sign gives every entry a nonzero momentum, and an entry whose frozen variance is 0 then steps by
    ~ lr * scale / eps (DeepSpeed's reason for exp_avg_mask). A mask with a 0 there keeps it where it was; at the
    first compressed step the other entries move exactly as without the mask."""
    p, opt = _dead_entry_run(5)
    assert opt.state[p]["exp_avg_sq"][0] == 0 and abs(p[0].item() - 1) > 100  # lr 1e-3 / eps 1e-8 ~ 1e5 * scale
    mask = torch.ones(16, dtype=F64)
    mask[0] = 0
    q, _ = _dead_entry_run(5, groups=[{"exp_avg_mask": mask}])
    assert q[0].item() == 1.0 and (q[1:] != 1).all()
    torch.testing.assert_close(q[1:], p[1:], rtol=0, atol=0)
    q, _ = _dead_entry_run(9, groups=[{"exp_avg_mask": mask}])
    assert q[0].item() == 1.0 and q.isfinite().all()


def test_exp_avg_mask_is_checked_and_kept_across_a_checkpoint() -> None:
    q = torch.nn.Parameter(torch.ones(8, dtype=F64))
    opt = OneBitAdam([{"params": [q], "exp_avg_mask": torch.ones(3)}], lr=1e-3, freeze_step=2, workers=2)
    with pytest.raises(ValueError, match="exp_avg_mask"):
        for _ in range(3):
            opt.step(worker_grads=torch.ones(2, 8, dtype=F64))
    mask = torch.zeros(8, dtype=F64)
    saved = OneBitAdam([{"params": [q], "exp_avg_mask": torch.ones(8, dtype=F64)}], lr=1e-3, freeze_step=2,
                       workers=2).state_dict()
    fresh = OneBitAdam([{"params": [q], "exp_avg_mask": mask}], lr=1e-3, freeze_step=2, workers=2)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["exp_avg_mask"] is mask  # the training script's mask, as in DeepSpeed
