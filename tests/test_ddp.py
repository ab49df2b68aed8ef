"""More than one process: `torchrun` and `accelerate launch` with 2 CPU ranks on gloo.

The SFT, reward and DPO loops end with the weights of one process that sees the same global batch, under plain data
parallel (DDP) and under FSDP2; the ranks end with identical weights; only rank 0 writes the run folder; checkpoints
resume across process counts (a 2-rank FSDP2 checkpoint in one process, a one-process checkpoint under 2 ranks); PPO
and the DPO losses that couple a batch's pairs refuse; `fttk train` under torchrun writes one run.

Tolerance. The comparisons run in float64. Two ranks sum the same terms as one process, grouped differently (each
rank's share, then the all-reduce), so an entry of a gradient differs by rounding only: |dg| <= n u sum|terms|, with
u = 2**-53 = 1.1e-16 and, at this size (n <= a few hundred tokens, sum|terms| <= 1), |dg| <= 1e-13. AdamW moves a
weight by lr m/(sqrt(v) + eps), whose derivative in the gradient is at most 1/eps, so after S steps the weights differ
by at most S lr |dg| / eps = 4 * 2e-3 * 1e-13 / 1e-8 = 8e-8 < TOL = 1e-7. Measured on a 2-core AVX2 CPU: 1e-14 (SFT,
reward) to 4e-13 (DPO). In float32 the same bound is ~1e9 times larger (u = 6e-8) and checks nothing, hence float64.
"""
import importlib.util, json, os, shutil, socket, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from fttk.core import RunFolder, load_tensors, safe_torch_load

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-7
STEPS = 4

JOB = textwrap.dedent('''
    """One fttk trainer run per job, under torchrun/accelerate launch (every rank) or in one process, in float64."""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from fttk import sft
    from fttk.core import RunFolder, save_tensors, set_seed
    from fttk.lora import LoRAConfig, inject_lora
    from fttk.world import base_model, lab_world, preference_pairs, preference_rows

    def run(job: dict):
        rank = os.environ.get('RANK', 'single')
        writes = []                     # what this process wrote into the run folder
        log, save = RunFolder.log, sft.save_tensors
        RunFolder.log = lambda self, step, **kw: (writes.append('metrics'), log(self, step, **kw))[1]
        sft.save_tensors = lambda *a, **kw: (writes.append('checkpoint'), save(*a, **kw))[1]
        try: out = _train(job)
        except (ValueError, OSError, RuntimeError) as e:
            if not job.get('error'): raise
            out = {'error': str(e)}
        finally: RunFolder.log, sft.save_tensors = log, save
        json.dump({**out, 'writes': sorted(set(writes))}, open(f"{job['out']}.rank{rank}.json", 'w'))

    def _train(job):
        model, tok = base_model('test', progress=False)
        world = lab_world('test')
        kw = dict(output_dir=job['out'], learning_rate=2e-3, max_steps=job.get('steps', 4),
                  per_device_train_batch_size=job['bs'], gradient_accumulation_steps=2, seed=1,
                  save_steps=job.get('save_steps'), fsdp=job.get('fsdp'))
        if job['kind'] == 'rm':
            from fttk.reward import RewardConfig, reward_model, reward_train
            model, tok = reward_model(model, tok, seed=0)
        if job.get('lora'):
            set_seed(0); inject_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules='all-linear'))
        model.double()
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        pairs = preference_pairs(preference_rows(world))[:30]
        resume = job.get('resume', False)
        plan = sft.parallel_plan(sft.TrainingConfig(fsdp=job.get('fsdp')))
        if job['kind'] == 'sft':
            rows = [r for r in world.instruction_rows() if r['task'] == 'qa'][:30]
            res = sft.sft_train(model, tok, rows, sft.SFTConfig(**kw, max_length=128), resume=resume,
                                progress=False)
        elif job['kind'] == 'rm':
            res = reward_train(model, tok, pairs, RewardConfig(**kw, max_length=256), resume=resume,
                               progress=False)
        elif job['kind'] == 'dpo':
            from fttk.dpo import DPOConfig, dpo_train
            cfg = DPOConfig(**kw, max_length=256, loss_type=job.get('loss_type', ['sigmoid']),
                            precompute_ref_log_probs=True)
            res = dpo_train(model, tok, pairs, cfg, resume=resume, progress=False)
        else:
            from fttk.ppo import PPOConfig, ppo_train
            res = ppo_train(model, None, None, tok, [], PPOConfig(output_dir=job['out']), progress=False)
        w = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        save_tensors(w, f"{job['out']}.rank{os.environ.get('RANK', 'single')}.safetensors")
        return {'log': res['log'], 'fsdp': plan.fsdp, 'world': plan.world,
                'moved': max((w[k] - start[k]).abs().max().item() for k in w)}

    if __name__ == '__main__':
        for job in json.load(open(sys.argv[1])): run(job)
''')


def _port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}


def _launch(tmp: Path, launcher: list[str], jobs: list[dict]) -> subprocess.CompletedProcess:
    (tmp/'job.py').write_text(JOB); (tmp/'jobs.json').write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, '-m', *launcher, 'job.py', 'jobs.json'], cwd=tmp, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _one(tmp: Path, job: dict):
    "The same job in this process (no WORLD_SIZE: one process)."
    (tmp/'job.py').write_text(JOB)
    spec = importlib.util.spec_from_file_location(f'job_{tmp.name}', tmp/'job.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    cwd = os.getcwd(); os.chdir(tmp)
    try: mod.run(job)
    finally: os.chdir(cwd)


def _cut(src: Path, dst: Path, step: int):
    "A copy of run folder `src` as a run killed after `step` leaves it: later checkpoints gone."
    shutil.copytree(src, dst)
    for c in RunFolder.open(dst).list_checkpoints():
        if int(c.name.split('_')[1]) > step: shutil.rmtree(c)


def _w(tmp: Path, name: str) -> dict: return load_tensors(tmp/f'{name}.safetensors')
def _j(tmp: Path, name: str) -> dict: return json.loads((tmp/f'{name}.json').read_text())
def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    "torchrun, 2 ranks of 2 rows each vs one process of 4 rows: SFT, reward, DPO with LoRA; resume; refusals."
    tmp = tmp_path_factory.mktemp('ddp')
    for kind in ('sft', 'rm', 'dpo'):
        _one(tmp, {'kind': kind, 'out': f'{kind}_one', 'bs': 4, 'lora': True, 'save_steps': 2})
    _cut(tmp/'sft_one', tmp/'sft_resumed', 2)
    _launch(tmp, ['torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_port())],
            [{'kind': k, 'out': f'{k}_ddp', 'bs': 2, 'lora': True, 'save_steps': 2} for k in ('sft', 'rm', 'dpo')]
            + [{'kind': 'sft', 'out': 'sft_resumed', 'bs': 2, 'lora': True, 'save_steps': 2, 'resume': True},
               {'kind': 'ppo', 'out': 'ppo', 'bs': 2, 'lora': True, 'error': True},
               {'kind': 'dpo', 'out': 'dpo_sft', 'bs': 2, 'lora': True, 'loss_type': ['sigmoid', 'sft'],
                'error': True},
               {'kind': 'sft', 'out': 'rm_one', 'bs': 2, 'lora': True, 'error': True}])     # a used folder
    return tmp


def test_ddp_equals_one_process(ddp):
    for kind in ('sft', 'rm', 'dpo'):
        two, one = _j(ddp, f'{kind}_ddp.rank0'), _j(ddp, f'{kind}_one.ranksingle')
        assert (two['world'], two['fsdp'], one['world']) == (2, None, 1)
        d = _diff(_w(ddp, f'{kind}_ddp.rank0'), _w(ddp, f'{kind}_one.ranksingle'))
        assert d < TOL, (kind, d)
        assert one['moved'] > 1e-3, (kind, one['moved'])              # the weights did move: 1e4 x TOL
        # the logged loss is the global batch's, on rank 0 as in one process
        assert [r['step'] for r in two['log']] == [r['step'] for r in one['log']] == list(range(1, STEPS + 1))
        for a, b in zip(two['log'], one['log']): assert abs(a['loss'] - b['loss']) < 1e-12 * max(1, abs(b['loss']))


def test_ddp_ranks_identical_and_rank0_alone_writes(ddp):
    for kind in ('sft', 'rm', 'dpo'):
        a, b = _w(ddp, f'{kind}_ddp.rank0'), _w(ddp, f'{kind}_ddp.rank1')
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _j(ddp, f'{kind}_ddp.rank0')['writes'] == ['checkpoint', 'metrics']
        assert _j(ddp, f'{kind}_ddp.rank1')['writes'] == []
        assert len(RunFolder.open(ddp/f'{kind}_ddp').read_metrics()) == STEPS       # one log, not one per rank
        assert [c.name for c in RunFolder.open(ddp/f'{kind}_ddp').list_checkpoints()] == ['step_000002', 'step_000004']
    assert (ddp/'dpo_ddp'/'ref_logps.safetensors').is_file()


def test_ddp_resumes_a_one_process_checkpoint(ddp):
    "Two ranks continue a one-process run killed after step 2 (same global batch) and end where it ended."
    assert _diff(_w(ddp, 'sft_resumed.rank0'), _w(ddp, 'sft_one.ranksingle')) < TOL
    assert [r['step'] for r in RunFolder.open(ddp/'sft_resumed').read_metrics()] == list(range(1, STEPS + 1))


def test_ppo_and_batch_coupled_dpo_losses_refuse(ddp):
    assert _j(ddp, 'ppo.rank0')['error'] == ("ppo_train under 2 processes (torchrun or accelerate launch): fttk's PPO "
                                             "does not split its rollouts over ranks; run it with one process")
    assert _j(ddp, 'dpo_sft.rank1')['error'] == ("loss_type ['sft'] under 2 processes: these losses couple the pairs "
                                                 "of a batch, so a rank's share has no loss of its own; run them with "
                                                 "one process")
    assert not (ddp/'ppo').exists() and not (ddp/'dpo_sft').exists()     # refused before any file


def test_a_used_run_folder_stops_every_rank(ddp):
    "Rank 0 refuses the folder as one process does; the other ranks stop too instead of waiting for it."
    assert _j(ddp, 'rm_one.rank0')['error'].startswith('run folder rm_one is not empty (it holds ')
    assert _j(ddp, 'rm_one.rank1')['error'] == "rank 0 refused the run folder rm_one: see its error"


@pytest.fixture(scope='module')
def fsdp(tmp_path_factory):
    """accelerate launch with data/configs/accelerate_fsdp2.yaml (its environment variables turn FSDP2 on): full
    fine-tuning of SFT and reward, DPO with LoRA."""
    pytest.importorskip('accelerate')
    tmp = tmp_path_factory.mktemp('fsdp')
    for kind in ('sft', 'rm'): _one(tmp, {'kind': kind, 'out': f'{kind}_one', 'bs': 4, 'save_steps': 2})
    _one(tmp, {'kind': 'dpo', 'out': 'dpo_one', 'bs': 4, 'lora': True})
    _cut(tmp/'sft_one', tmp/'sft_resumed', 2)
    _launch(tmp, ['accelerate.commands.launch', '--config_file', str(REPO/'data'/'configs'/'accelerate_fsdp2.yaml'),
                  '--main_process_port', str(_port())],
            [{'kind': 'sft', 'out': 'sft_fsdp', 'bs': 2, 'save_steps': 2},
             {'kind': 'rm', 'out': 'rm_fsdp', 'bs': 2},
             {'kind': 'dpo', 'out': 'dpo_fsdp', 'bs': 2, 'lora': True},
             {'kind': 'sft', 'out': 'sft_resumed', 'bs': 2, 'save_steps': 2, 'resume': True}])
    return tmp


def test_fsdp2_equals_one_process(fsdp):
    for kind in ('sft', 'rm', 'dpo'):
        two = _j(fsdp, f'{kind}_fsdp.rank0')
        assert (two['world'], two['fsdp']) == (2, {'reshard_after_forward': True, 'wrap': ['LlamaDecoderLayer']})
        d = _diff(_w(fsdp, f'{kind}_fsdp.rank0'), _w(fsdp, f'{kind}_one.ranksingle'))
        assert d < TOL, (kind, d)
        assert _j(fsdp, f'{kind}_one.ranksingle')['moved'] > 1e-3
        a, b = _w(fsdp, f'{kind}_fsdp.rank0'), _w(fsdp, f'{kind}_fsdp.rank1')
        assert all(torch.equal(a[k], b[k]) for k in a)                 # the gathered final state, on every rank
        assert _j(fsdp, f'{kind}_fsdp.rank1')['writes'] == []


def test_fsdp2_checkpoints_are_whole_and_resume_across_process_counts(fsdp, tmp_path):
    one, two = RunFolder.open(fsdp/'sft_one'), RunFolder.open(fsdp/'sft_fsdp')
    for c1, c2 in zip(one.list_checkpoints(), two.list_checkpoints(), strict=True):
        w1, w2 = load_tensors(c1/'model.safetensors'), load_tensors(c2/'model.safetensors')
        assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}    # gathered, not shards
        assert _diff(w1, w2) < TOL
        o1, o2 = safe_torch_load(c1/'optimizer.pt'), safe_torch_load(c2/'optimizer.pt')
        assert o1['param_groups'] == o2['param_groups'] and o1['state'].keys() == o2['state'].keys()
        assert all(type(v) is torch.Tensor for s in o2['state'].values() for v in s.values())
    # FSDP2 under 2 ranks continued the one-process run from its step-2 checkpoint
    assert _diff(_w(fsdp, 'sft_resumed.rank0'), _w(fsdp, 'sft_one.ranksingle')) < TOL
    # and one process continues the 2-rank FSDP2 run from its step-2 checkpoint
    _cut(fsdp/'sft_fsdp', tmp_path/'sft_back', 2)
    _one(tmp_path, {'kind': 'sft', 'out': 'sft_back', 'bs': 4, 'save_steps': 2, 'resume': True})
    assert _diff(_w(tmp_path, 'sft_back.ranksingle'), _w(fsdp, 'sft_fsdp.rank0')) < TOL


def test_fttk_train_under_torchrun(tmp_path):
    """`fttk train` (its main) under torchrun: one run folder, one log, rank 0 alone prints, the final adapter
    saved. Float32: the weights are compared in float64 above; here the first step's loss, computed before any
    update, agrees with one process to float32 rounding of a sum of ~10^3 token losses (1e3 * 6e-8 relative)."""
    import yaml
    from fttk.train import train
    base = {'stage': 'sft', 'model_name_or_path': 'lab:test', 'dataset': 'lab:instructions', 'max_samples': 48,
            'finetuning_type': 'lora', 'r': 8, 'lora_alpha': 16, 'target_modules': 'all-linear',
            'learning_rate': 2e-3, 'max_steps': 3, 'gradient_accumulation_steps': 2, 'seed': 3}
    (tmp_path/'ddp.yaml').write_text(yaml.safe_dump({**base, 'per_device_train_batch_size': 4, 'output_dir': 'ddp'}))
    (tmp_path/'launch.py').write_text("import sys\nfrom fttk.cli import main\nsys.exit(main(['train', 'ddp.yaml']))\n")
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                        str(_port()), 'launch.py'], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('fttk train: stage sft') == 1 and p.stdout.count('run folder:') == 1
    assert (tmp_path/'ddp'/'final'/'adapter_model.safetensors').is_file()
    single = train({**base, 'per_device_train_batch_size': 8, 'output_dir': str(tmp_path/'one')}, progress=False)['run']
    two, one = RunFolder.open(tmp_path/'ddp').read_metrics(), RunFolder.open(single).read_metrics()
    assert [r['step'] for r in two] == [r['step'] for r in one] == [1, 2, 3]
    assert abs(two[0]['loss'] - one[0]['loss']) < 1e-4 * one[0]['loss']


def _fttk(tmp: Path, launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    "`fttk ARGS` (its main) under a launcher, in `tmp`."
    (tmp/'launch.py').write_text("import sys\nfrom fttk.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, '-m', *launcher, 'launch.py', *args], cwd=tmp, env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_fttk_train_every_stage_under_launchers(tmp_path):
    """The shipped launch files: `accelerate launch` + accelerate_fsdp2.yaml runs data/configs/fsdp2.yaml (full SFT,
    FSDP2); from that run folder, `accelerate launch` + accelerate_ddp.yaml runs rm and torchrun runs dpo, both data
    parallel; ppo refuses. Each multi-process run
    writes one run folder and a final model that load_run loads; its first logged loss (computed before any update,
    so the rounding bound of test_fttk_train_under_torchrun holds) equals one process's with the same global batch,
    and so do its final weights, to 1e-5 (float32; measured 2.4e-7 at most, against weights that moved 3e-4)."""
    pytest.importorskip('accelerate')
    import yaml
    from fttk.train import load_run, train
    accel = lambda f: ['accelerate.commands.launch', '--config_file', str(REPO/'data'/'configs'/f),
                       '--main_process_port', str(_port())]
    torchrun = lambda: ['torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_port())]
    small = ['max_steps=2', 'max_samples=32']
    runs = [('sft', accel('accelerate_fsdp2.yaml'), str(REPO/'data'/'configs'/'fsdp2.yaml'), [], 'FSDP2'),
            ('rm', accel('accelerate_ddp.yaml'), str(REPO/'examples'/'rm_lora.yaml'), ['model_name_or_path=sft'],
             'DDP'),
            ('dpo', torchrun(), str(REPO/'examples'/'dpo_lora.yaml'), ['model_name_or_path=sft'], 'DDP')]
    for stage, launcher, cfg, extra, how in runs:
        p = _fttk(tmp_path, launcher, ['train', cfg, *small, *extra, f'output_dir={stage}'])
        assert p.returncode == 0, (stage, p.stdout[-2000:] + p.stderr[-3000:])
        assert p.stdout.count(f'fttk train: stage {stage}') == 1, (stage, p.stdout)
        assert f'rows), 2 processes ({how}) -> {stage}' in p.stdout, (stage, p.stdout)
        trained, _, meta = load_run(tmp_path/stage)
        assert meta['stage'] == stage
        raw = {**yaml.safe_load(Path(cfg).read_text()), **dict(a.split('=', 1) for a in small + extra)}
        raw = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in raw.items()}
        if stage != 'sft': raw['model_name_or_path'] = str(tmp_path/'sft')
        raw.pop('fsdp', None); raw.pop('fsdp_config', None)
        raw.update(per_device_train_batch_size=2 * raw['per_device_train_batch_size'],
                   output_dir=str(tmp_path/f'{stage}_one'))
        train(raw, progress=False)
        two = RunFolder.open(tmp_path/stage).read_metrics()
        one = RunFolder.open(tmp_path/f'{stage}_one').read_metrics()
        key = 'loss'
        assert [r['step'] for r in two if key in r] == [r['step'] for r in one if key in r] == [1, 2], stage
        a, b = next(r[key] for r in two if key in r), next(r[key] for r in one if key in r)
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (stage, a, b)
        # the final weights: float32 end to end, so no rounding bound is derived here (float64 above
        # proves the arithmetic); this checks the wiring, a rank that trained on the wrong rows
        # would be off by as much as the weights moved. Measured: 1.6e-7 .. 2.4e-7, moved >= 3e-4
        wa, wb = trained.state_dict(), load_run(tmp_path/f'{stage}_one')[0].state_dict()
        w0 = load_run(str(tmp_path/'sft') if stage != 'sft' else 'lab:test')[0].state_dict()
        assert wa.keys() == wb.keys()
        moved = max((wb[k] if 'lora_B' in k else wb[k] - w0[k]).abs().max().item()
                    for k in wb if 'lora_B' in k or k in w0)
        d = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        print(f'{stage}: weights {d:.1e} from one process, moved {moved:.1e}')
        assert d < 1e-5 < moved / 10, (stage, d, moved)
        for x, y in zip([r for r in two if key in r], [r for r in one if key in r]):
            assert abs(x[key] - y[key]) < 1e-4 * abs(y[key]), (stage, x, y)
    p = _fttk(tmp_path, torchrun(), ['train', str(REPO/'examples'/'ppo_lora.yaml'), 'model_name_or_path=sft',
                                     'reward_model=rm', 'output_dir=ppo'])
    assert p.returncode != 0 and ("stage ppo under 2 processes: fttk's PPO rolls out, scores and updates in one "
                                  "process") in p.stderr, p.stderr[-3000:]
    assert not (tmp_path/'ppo').exists()


@pytest.mark.parametrize('cfg,env,msg', [
    ({'fsdp': 'offload'}, {}, "fsdp='offload': fttk's FSDP2 takes one of 'full_shard', 'shard_grad_op'"),
    ({'fsdp': True, 'fsdp_config': {'version': 1}}, {}, r"fsdp_config version 1: fttk shards with FSDP2 only"),
    ({'fsdp_config': {'min_num_params': 1}}, {}, r"fsdp_config has unknown key\(s\) \['min_num_params'\]"),
    ({'fsdp': True, 'fsdp_config': {'reshard_after_forward': 'yes'}}, {},
     "fsdp_config reshard_after_forward must be true or false, got 'yes'"),
    ({'ddp_timeout': 0}, {}, 'ddp_timeout must be > 0 seconds, got 0'),
    ({}, {'ACCELERATE_USE_FSDP': 'true', 'FSDP_VERSION': '1'}, 'asked for FSDP version 1: fttk shards with FSDP2 only'),
    ({}, {'ACCELERATE_USE_DEEPSPEED': 'true'}, "asked for DeepSpeed, which fttk's trainers do not run under"),
    ({}, {'ACCELERATE_MIXED_PRECISION': 'fp16'},
     "asked for mixed_precision 'fp16', the fttk config has bf16: False: fttk's config decides the precision"),
])
def test_bad_parallel_settings(cfg, env, msg, monkeypatch):
    "Settings fttk cannot honour are refused by name (config at construction, launcher at the start of training)."
    from fttk.core import ConfigError
    from fttk.sft import SFTConfig, parallel_plan
    for k, v in env.items(): monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=msg): parallel_plan(SFTConfig(**cfg))
