"Real multi-process runs (gloo, CPU): measured per-rank model-state bytes vs fttk.memory, and sharded == single-process training."
import pytest
import torch

from fttk.core import ConfigError
from fttk.distributed import ENGINES, ShardedRunConfig, compare, model_state_bytes, run_sharded, train_single
from fttk.memory import model_spec


def _check(cfg: ShardedRunConfig):
    results = run_sharded(cfg)
    psi = model_spec(f'lab:{cfg.size}').n_params
    rows = compare(results, psi, cfg.world_size)
    assert len(rows) == len(cfg.engines)*cfg.world_size
    for r in rows: assert r['ratio'] == pytest.approx(1.0, abs=0.05), r
    ref, ref_losses = train_single(cfg)
    for e, res in results.items():
        assert sorted(res.weights) == sorted(ref)
        for n in ref: torch.testing.assert_close(res.weights[n], ref[n], rtol=0, atol=1e-4)
        assert sum(r['losses'][0] for r in res.ranks)/cfg.world_size == pytest.approx(ref_losses[0], abs=1e-5)
    return results, rows


def test_two_ranks_ddp_and_fsdp2():
    results, rows = _check(ShardedRunConfig(size='test', engines=['ddp', 'fsdp2'], world_size=2, steps=2, seq=16))
    by = {r['engine']: r for r in rows if r['rank'] == 0}
    # on 2 ranks, stage 3 holds exactly half of stage 0 (16 bytes/param, all sharded)
    assert by['fsdp2']['measured'] * 2 == by['ddp']['measured']


@pytest.mark.slow
def test_two_ranks_all_engines():
    results, rows = _check(ShardedRunConfig(size='test', world_size=2, steps=3, seq=16))
    keep = results['fsdp2-keep'].ranks[0]['snapshots']
    assert keep['fwd']['params'] > keep['step']['params']      # full weights held from forward to backward


@pytest.mark.slow
def test_four_ranks_all_engines():
    _check(ShardedRunConfig(size='test', world_size=4, steps=2, per_device_train_batch_size=1, seq=16))


def test_model_state_bytes_counts_views_once():
    m = torch.nn.Linear(8, 8); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(3, 8)).sum().backward(); opt.step()
    assert model_state_bytes(m, opt) == {'params': 72*4, 'grads': 72*4, 'optim': 72*4}


def test_bad_run_config():
    with pytest.raises(ConfigError, match=r"unknown engine\(s\) \['deepspeed'\]"): ShardedRunConfig(engines=['deepspeed'])
    with pytest.raises(ConfigError, match='world_size must be a positive integer, got 0'): ShardedRunConfig(world_size=0)
    assert set(ENGINES) == {'ddp', 'zero1', 'fsdp2-keep', 'fsdp2'}
