"""FedAvg core: aggregation arithmetic, server optimizers, determinism, secure agg, DP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import MnistSplit, to_tensor
from training.fedavg import (
    ClientResult,
    FedAdamServer,
    FedAvgMServer,
    FedAvgServer,
    FedConfig,
    aggregate,
    client_seed,
    client_update,
    combine,
    evaluate,
    init_model,
    random_shift,
    train,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mnist_test_1000.npz"
SMALL = FedConfig(rounds=2, clients=10, fraction=0.3, local_epochs=1, batch_size=10, eval_limit=300)


@pytest.fixture(scope="module")
def mnist1000() -> MnistSplit:
    with np.load(FIXTURE) as npz:
        return MnistSplit(images=npz["images"], labels=npz["labels"].astype(np.int64))


def weights(result_model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in result_model.parameters()]


def test_aggregate_weighting_by_hand() -> None:
    a = ClientResult([torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])], n_examples=1, loss=0.0)
    b = ClientResult([torch.tensor([3.0, 6.0]), torch.tensor([[0.0]])], n_examples=3, loss=0.0)
    out = aggregate([a, b])
    assert torch.equal(out[0], torch.tensor([2.5, 5.0]))
    assert torch.equal(out[1], torch.tensor([[1.0]]))
    assert torch.equal(aggregate([a])[0], a.delta[0])
    with pytest.raises(ValueError):
        aggregate([])


def test_server_optimizers_by_hand() -> None:
    w, d = [torch.tensor([1.0, -1.0])], [torch.tensor([0.5, -2.0])]
    assert torch.equal(FedAvgServer(2.0).step(w, d)[0], torch.tensor([2.0, -5.0]))
    m = FedAvgMServer(1.0, 0.5)
    w1 = m.step(w, d)
    assert torch.equal(w1[0], torch.tensor([1.5, -3.0]))
    w2 = m.step(w1, d)  # v = 0.5 * d + d
    assert torch.allclose(w2[0], w1[0] + 1.5 * d[0])
    adam = FedAdamServer(server_lr=0.01, tau=1e-3)
    step = adam.step(w, d)[0] - w[0]
    expect = 0.01 * 0.1 * d[0] / ((0.01 * d[0] ** 2).sqrt() + 1e-3)
    assert torch.allclose(step, expect)


def test_client_update_delta_and_state_dict_input(mnist1000: MnistSplit) -> None:
    model = init_model(0)
    x, y = to_tensor(mnist1000.images[:50]), torch.from_numpy(mnist1000.labels[:50])
    res = client_update(model.state_dict(), x, y, SMALL, seed=5)
    res2 = client_update(list(model.parameters()), mnist1000.images[:50], y, SMALL, seed=5)
    assert res.n_examples == 50 and math.isfinite(res.loss)
    assert [d.shape for d in res.delta] == [p.shape for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(res.delta, res2.delta, strict=True))
    assert any(float(d.abs().max()) > 0 for d in res.delta)
    assert client_seed(0, 1, 2) != client_seed(0, 2, 1)


def test_determinism_and_learning(mnist1000: MnistSplit) -> None:
    init_acc, init_loss = evaluate(
        init_model(SMALL.seed),
        to_tensor(mnist1000.images[:300]),
        torch.from_numpy(mnist1000.labels[:300]),
    )
    cfg = FedConfig(
        rounds=2, clients=5, fraction=1.0, local_epochs=4, batch_size=10, eval_limit=300
    )
    seen: list[int] = []
    a = train(cfg, mnist1000, mnist1000, progress=lambda r, m: seen.append(r))
    b = train(cfg, mnist1000, mnist1000)
    assert seen == [1, 2]
    assert all(torch.equal(x, y) for x, y in zip(weights(a.model), weights(b.model), strict=True))
    final = a.history[-1]
    assert final.test_accuracy is not None and final.test_accuracy > init_acc + 0.3
    assert final.test_loss is not None and final.test_loss < init_loss
    assert final.clients == 5 and final.epsilon is None and final.seconds > 0
    c = train(FedConfig(**{**cfg.__dict__, "seed": 1}), mnist1000, mnist1000)
    assert not torch.equal(weights(a.model)[0], weights(c.model)[0])


@pytest.mark.parametrize(("opt", "lr"), [("fedavgm", 1.0), ("fedadam", 1e-2)])
def test_server_optimizers_run(mnist1000: MnistSplit, opt: str, lr: float) -> None:
    cfg = FedConfig(**{**SMALL.__dict__, "server_opt": opt, "server_lr": lr, "eval_every": 2})
    res = train(cfg, mnist1000, mnist1000)
    assert res.history[0].test_accuracy is None  # eval_every=2 skips round 1
    assert res.history[1].test_accuracy is not None
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_secure_agg_equals_plaintext(mnist1000: MnistSplit) -> None:
    model = init_model(0)
    params = list(model.parameters())
    results = [
        client_update(
            params,
            mnist1000.images[i * 70 : i * 70 + 30 + 10 * i],
            mnist1000.labels[i * 70 : i * 70 + 30 + 10 * i],
            SMALL,
            seed=i,
        )
        for i in range(4)
    ]
    plain = aggregate(results)
    secure = combine(results, FedConfig(**{**SMALL.__dict__, "secure_agg": True}))
    for p, s in zip(plain, secure, strict=True):
        assert torch.allclose(p, s, atol=2.0**-20, rtol=0)
    cfg = FedConfig(**{**SMALL.__dict__, "rounds": 1})
    a = train(cfg, mnist1000, mnist1000)
    b = train(FedConfig(**{**cfg.__dict__, "secure_agg": True}), mnist1000, mnist1000)
    for x, y in zip(weights(a.model), weights(b.model), strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=0)


def test_dp_epsilon_grows_with_rounds_and_shrinks_with_noise(mnist1000: MnistSplit) -> None:
    cfg = FedConfig(**{**SMALL.__dict__, "dp_clip": 0.5, "dp_noise": 1.0})
    run = train(cfg, mnist1000, mnist1000, noise_seed=3)
    eps = [m.epsilon for m in run.history]
    assert all(e is not None and 0 < e < math.inf for e in eps)
    assert eps[1] > eps[0]  # type: ignore[operator]
    again = train(cfg, mnist1000, mnist1000, noise_seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(weights(run.model), weights(again.model), strict=True)
    )
    noisier = train(
        FedConfig(**{**cfg.__dict__, "dp_noise": 2.0, "secure_agg": True}), mnist1000, mnist1000
    )
    assert noisier.history[-1].epsilon < eps[-1]  # type: ignore[operator]


def test_dp_combine_is_clipped_unweighted_mean() -> None:
    big = ClientResult([torch.tensor([30.0, 40.0])], n_examples=100, loss=0.0)  # norm 50
    small = ClientResult([torch.tensor([0.3, 0.0])], n_examples=1, loss=0.0)
    cfg = FedConfig(clients=2, fraction=1.0, dp_clip=1.0, dp_noise=0.0)
    out = combine([big, small], cfg)
    assert torch.allclose(out[0], torch.tensor([(0.6 + 0.3) / 2, 0.8 / 2]))


def test_client_lr_decay_and_momentum(mnist1000: MnistSplit) -> None:
    cfg = FedConfig(**{**SMALL.__dict__, "lr": 0.2, "lr_decay": 0.5})
    assert cfg.client_lr(1) == 0.2 and cfg.client_lr(3) == pytest.approx(0.05)
    params = list(init_model(0).parameters())
    x, y = mnist1000.images[:30], mnist1000.labels[:30]
    # round 3 at lr 0.2 * 0.5**2 takes exactly the steps of round 1 at lr 0.05
    decayed = client_update(params, x, y, cfg, seed=1, round_index=3)
    flat = client_update(params, x, y, FedConfig(**{**SMALL.__dict__, "lr": 0.05}), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(decayed.delta, flat.delta, strict=True))
    # one local step: momentum changes nothing; later steps it does, deterministically
    one = FedConfig(**{**SMALL.__dict__, "batch_size": 30})
    plain = client_update(params, x, y, one, seed=1)
    heavy = client_update(params, x, y, FedConfig(**{**one.__dict__, "client_momentum": 0.9}), 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.delta, heavy.delta, strict=True))
    mom = FedConfig(**{**SMALL.__dict__, "client_momentum": 0.9})
    a = client_update(params, x, y, mom, seed=1)
    b = client_update(params, x, y, mom, seed=1)
    c = client_update(params, x, y, SMALL, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a.delta, b.delta, strict=True))
    assert not torch.equal(a.delta[0], c.delta[0])
    # the same steps as torch.optim.SGD(momentum=0.9) over the same minibatch order
    model = init_model(0)
    sgd = torch.optim.SGD(model.parameters(), lr=mom.lr, momentum=0.9)
    xt, yt = to_tensor(x), torch.from_numpy(y)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    for i in range(0, 30, mom.batch_size):
        sgd.zero_grad()
        idx = perm[i : i + mom.batch_size]
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        sgd.step()
    for d, p0, p1 in zip(a.delta, params, model.parameters(), strict=True):
        assert torch.allclose(d, p1.detach() - p0, atol=1e-6)
    # end to end: deterministic under the seed
    run = train(FedConfig(**{**mom.__dict__, "lr_decay": 0.9}), mnist1000, mnist1000)
    again = train(FedConfig(**{**mom.__dict__, "lr_decay": 0.9}), mnist1000, mnist1000)
    assert all(
        torch.equal(u, v) for u, v in zip(weights(run.model), weights(again.model), strict=True)
    )


def test_wide_model_and_early_stop(mnist1000: MnistSplit) -> None:
    small = sum(p.numel() for p in init_model(0).parameters())
    wide = init_model(0, "cnn-wide")
    assert small == 33_542 and sum(p.numel() for p in wide.parameters()) == 155_606
    assert [n for n, _ in wide.named_parameters()] == [
        n for n, _ in init_model(0).named_parameters()
    ]
    cfg = FedConfig(
        rounds=3, clients=3, fraction=1.0, local_epochs=1, model="cnn-wide", eval_limit=100
    )
    part = MnistSplit(images=mnist1000.images[:150], labels=mnist1000.labels[:150])
    res = train(cfg, part, mnist1000, stop=lambda m: m.round == 2)
    assert [m.round for m in res.history] == [1, 2]
    assert res.model.conv2.out_channels == 64
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="server_opt"):
        FedConfig(server_opt="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        FedConfig(partition="dirichlet:0")
    with pytest.raises(ValueError, match="dp_clip"):
        FedConfig(dp_noise=1.0)
    with pytest.raises(ValueError, match="model"):
        FedConfig(model="resnet")
    with pytest.raises(ValueError, match="lr_decay"):
        FedConfig(lr_decay=0.0)
    with pytest.raises(ValueError, match="client_momentum"):
        FedConfig(client_momentum=1.0)
    assert FedConfig().clients_per_round == 10
    assert FedConfig(clients=3, fraction=0.01).clients_per_round == 1


def test_random_shift_moves_each_image_within_bounds() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    gen = torch.Generator().manual_seed(0)
    out = random_shift(x, 2, gen)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), torch.ones(64))
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 9 - 4, where % 9 - 4
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # 64 draws reach both ends
    assert len({(int(a), int(b)) for a, b in zip(dy, dx, strict=True)}) > 10  # per image
    assert torch.equal(out, random_shift(x, 2, torch.Generator().manual_seed(0)))
    assert random_shift(x, 0, gen) is x
    with pytest.raises(ValueError, match="augment_shift"):
        FedConfig(augment_shift=5)


def test_augmentation_and_dropout_are_seeded_by_the_client(mnist1000: MnistSplit) -> None:
    from training import model as models

    models.MODELS["tiny-dropout"] = {
        "engine": True,
        "conv1_channels": 4,
        "conv2_channels": 8,
        "hidden": 16,
        "dropout": 0.5,
    }
    try:
        cfg = FedConfig(**{**SMALL.__dict__, "model": "tiny-dropout", "augment_shift": 2})
        params = list(init_model(0, "tiny-dropout").parameters())
        x, y = mnist1000.images[:30], mnist1000.labels[:30]
        state = torch.random.get_rng_state()
        a = client_update(params, x, y, cfg, seed=1)
        assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
        b = client_update(params, x, y, cfg, seed=1)
        c = client_update(params, x, y, cfg, seed=2)
        plain = client_update(params, x, y, FedConfig(**{**cfg.__dict__, "augment_shift": 0}), 1)
        assert all(torch.equal(u, v) for u, v in zip(a.delta, b.delta, strict=True))
        assert not torch.equal(a.delta[0], c.delta[0])
        assert not torch.equal(a.delta[0], plain.delta[0])
        run = train(FedConfig(**{**cfg.__dict__, "rounds": 1}), mnist1000, mnist1000)
        assert run.history[0].test_accuracy is not None
    finally:
        del models.MODELS["tiny-dropout"]


def test_benchmark_row_reports_the_private_inference_cost(mnist1000: MnistSplit) -> None:
    from benchmarks import federated

    args = federated.parser().parse_args([])
    assert args.model == "cnn-bn" and args.augment_shift is None  # the served architecture
    assert args.bn_freeze_round is None  # per split: 0 IID, NONIID_BN_FREEZE non-IID
    cfg = FedConfig(**{**SMALL.__dict__, "rounds": 1})
    row = federated.run(cfg, mnist1000, mnist1000, "t", quiet=True, stop_at_target=False)
    assert row["rounds_run"] == 1 and row["final_accuracy"] is not None
    assert row["min_last_5"] == row["final_accuracy"] and row["stays_99_from"] is None
    assert row["relus_per_image"] == 2660 and row["comparisons_per_image"] == 2660
    assert row["config"]["augment_shift"] == 0


def test_batchnorm_statistics_are_averaged_plainly_while_fedavgm_moves_the_weights(
    mnist1000: MnistSplit,
) -> None:
    """A round averages the running statistics (example-weighted, like FedAvg) next to the
    parameters; the server optimizer (here momentum) applies to the parameters only. Replayed by
    hand from the clients' own updates."""
    from training import model as models
    from training.fedavg import model_tensors, state_names
    from training.partition import parse_partition

    models.MODELS["tiny-bn"] = {
        "engine": True,
        "conv1_channels": 4,
        "conv2_channels": 8,
        "hidden": 16,
        "pool": "avg",
        "batchnorm": True,
        "batchnorm_fc": True,
    }
    try:
        part = MnistSplit(images=mnist1000.images[:90], labels=mnist1000.labels[:90])
        base = {**SMALL.__dict__, "model": "tiny-bn", "clients": 3, "fraction": 1.0}
        cfg = FedConfig(**{**base, "server_opt": "fedavgm", "server_momentum": 0.5})
        names = state_names(init_model(0, "tiny-bn"))
        assert names[-6:] == [
            f"{bn}.{s}" for bn in ("bn1", "bn2", "bn3") for s in ("running_mean", "running_var")
        ]
        n_params = len(names) - 6
        w0 = [t.detach().clone() for t in model_tensors(init_model(0, "tiny-bn"))]
        x, y = to_tensor(part.images), torch.from_numpy(part.labels)
        shards = parse_partition("iid")(np.asarray(part.labels), 3, 0)

        def mean_delta(w: list[torch.Tensor], r: int) -> list[torch.Tensor]:
            res = [
                client_update(w, x[idx], y[idx], cfg, client_seed(0, r, k), r)
                for k, idx in enumerate(shards)
            ]
            assert len(res[0].delta) == len(names)  # the statistics travel with the weights
            return combine(res, cfg)

        d1 = mean_delta(w0, 1)
        w1 = [w + d for w, d in zip(w0, d1, strict=True)]  # round 1: momentum has no past yet
        d2 = mean_delta(w1, 2)
        expect = [w + 0.5 * a + b for w, a, b in zip(w1[:n_params], d1, d2, strict=False)]
        expect += [w + b for w, b in zip(w1[n_params:], d2[n_params:], strict=True)]
        got = train(FedConfig(**{**cfg.__dict__, "rounds": 2}), part, mnist1000).model
        for name, g, e in zip(names, model_tensors(got), expect, strict=True):
            assert torch.allclose(g, e, atol=1e-6), name
        assert float(got.bn1.running_var.sub(1).abs().max()) > 1e-3  # the statistics moved
        # secure aggregation sums the statistics with the weights: the same model, to rounding
        secure = train(
            FedConfig(**{**base, "rounds": 1, "secure_agg": True}), part, mnist1000
        ).model
        plain = train(FedConfig(**{**base, "rounds": 1}), part, mnist1000).model
        for name, a, b in zip(names, model_tensors(secure), model_tensors(plain), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), name
    finally:
        del models.MODELS["tiny-bn"]


def test_bn_freeze_round_trains_with_the_global_statistics(mnist1000: MnistSplit) -> None:
    """From bn_freeze_round on, local training normalises with the running statistics it was
    sent (inference-mode batch norm): their delta is zero and the weights move differently
    than with batch statistics; before that round nothing changes."""
    from training.fedavg import init_model, model_tensors, state_names

    cfg = FedConfig(model="cnn-bn", local_epochs=1, batch_size=10, bn_freeze_round=3)
    start = [t.detach().clone() for t in model_tensors(init_model(0, "cnn-bn"))]
    x, y = mnist1000.images[:30], mnist1000.labels[:30]
    names = state_names(init_model(0, "cnn-bn"))
    stats = [i for i, n in enumerate(names) if n.endswith(("running_mean", "running_var"))]
    early = client_update(start, x, y, cfg, seed=1, round_index=2)
    late = client_update(start, x, y, cfg, seed=1, round_index=3)
    never = client_update(start, x, y, FedConfig(**{**cfg.__dict__, "bn_freeze_round": 0}), 1, 3)
    assert all(torch.equal(a, b) for a, b in zip(early.delta, never.delta, strict=True))
    assert all(float(late.delta[i].abs().max()) == 0 for i in stats)
    assert all(float(never.delta[i].abs().max()) > 0 for i in stats)
    assert not torch.equal(late.delta[0], never.delta[0])
    with pytest.raises(ValueError, match="bn_freeze_round"):
        FedConfig(bn_freeze_round=-1)
