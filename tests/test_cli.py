"The fttk command: subcommands run through the console script and through main()."
import json, subprocess, sys
from pathlib import Path

import pytest

from fttk.cli import main

FTTK = Path(sys.executable).parent/'fttk'


def test_info_prints_fingerprint(capsys):
    assert main(['info']) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp['versions']['torch'] and fp['hardware']['cpu_count'] >= 1


def test_world_build_writes_jsonl(tmp_path, capsys):
    assert main(['world', 'build', '--size', 'test', '--out', str(tmp_path)]) == 0
    people = [json.loads(l) for l in (tmp_path/'people.jsonl').read_text().splitlines()]
    assert len(people) == 120 and {'name', 'birth_city', 'employer_city', 'known'} <= set(people[0])


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e: main(['world', 'build', '--size', 'gigantic'])
    assert e.value.code == 2
    assert "invalid choice: 'gigantic'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['memory', '--params', '-5'])
    assert e.value.code == 2


def test_memory_subcommand_is_wired(capsys):
    assert main(['memory', '--params', '7.5e9', '--stage', '0', '--ranks', '64']) == 0
    assert '120' in capsys.readouterr().out


def test_demo_console_script(tmp_path):
    "The main job through the installed console script, on the test-size world (cached base model)."
    out = tmp_path/'demo'
    r = subprocess.run([str(FTTK), 'demo', '--size', 'test', '--out', str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out/'report.md').read_text()
    assert 'Greedy fact recall' in report and 'known people' in report
    assert 'Supervised fine-tuning (LoRA)' in report and 'QA exact match' in report
    assert (out/'plots'/'sft_loss.png').stat().st_size > 5_000
    assert '## Reward model' in report and 'Bayes ceiling' in report
    assert (out/'reward'/'metrics.jsonl').exists() and (out/'reward'/'config.yaml').exists()
    png = out/'plots'/'pretraining.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    assert json.loads((out/'fingerprint.json').read_text())['data_hash']


def test_demo_never_overwrites(tmp_path, capsys):
    "A non-empty --out is refused with one line (no traceback) and left as it was; --overwrite replaces an fttk run."
    out = tmp_path/'results'; out.mkdir(); (out/'notes.txt').write_text('mine')
    assert main(['demo', '--size', 'test', '--no-sft', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'fttk: error: run folder {out} is not empty (it holds notes.txt)') and 'Traceback' not in err
    assert [p.name for p in out.iterdir()] == ['notes.txt'] and (out/'notes.txt').read_text() == 'mine'
    assert main(['demo', '--size', 'test', '--no-sft', '--out', str(out), '--overwrite']) == 2
    assert 'is not an fttk run folder' in capsys.readouterr().err and (out/'notes.txt').read_text() == 'mine'
    run = tmp_path/'run'
    assert main(['demo', '--size', 'test', '--no-sft', '--out', str(run)]) == 0
    first = (run/'report.md').read_text()
    assert main(['demo', '--size', 'test', '--no-sft', '--out', str(run)]) == 2
    assert (run/'report.md').read_text() == first
    assert main(['demo', '--size', 'test', '--no-sft', '--out', str(run), '--overwrite']) == 0


def test_demo_default_folder_is_fresh(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path/'runs'/'demo').mkdir(parents=True); (tmp_path/'runs'/'demo'/'report.md').write_text('earlier')
    assert main(['demo', '--size', 'test', '--no-sft']) == 0
    assert (tmp_path/'runs'/'demo'/'report.md').read_text() == 'earlier'
    assert (tmp_path/'runs'/'demo-2'/'report.md').exists()


def test_world_build_default_never_touches_data(tmp_path, monkeypatch, capsys):
    "The default --out is runs/world-SIZE; data/ is only written when named, and other content needs --overwrite."
    monkeypatch.chdir(tmp_path)
    (tmp_path/'data').mkdir(); (tmp_path/'data'/'qa.jsonl').write_text('shipped')
    assert main(['world', 'build', '--size', 'test']) == 0
    assert (tmp_path/'data'/'qa.jsonl').read_text() == 'shipped'
    assert sorted(p.name for p in (tmp_path/'runs'/'world-test').iterdir()) == \
        ['corpus.jsonl', 'instructions.jsonl', 'people.jsonl', 'preferences.jsonl', 'qa.jsonl']
    assert main(['world', 'build', '--size', 'test', '--out', 'data']) == 2
    assert 'data already holds qa.jsonl with other content' in capsys.readouterr().err
    assert (tmp_path/'data'/'qa.jsonl').read_text() == 'shipped' and not (tmp_path/'data'/'people.jsonl').exists()


def test_info_names_isa_flags(capsys):
    assert main(['info']) == 0
    cpu = json.loads(capsys.readouterr().out)['hardware']['cpu']
    assert {'avx2', 'avx512f', 'avx512_bf16', 'amx', 'torch_cpu_capability'} <= set(cpu)


def test_train_console_script(tmp_path):
    "`fttk train EXAMPLE.yaml key=value ...` through the installed script: a progress bar with the loss, the run folder, exit 2 on a bad key."
    example = Path(__file__).resolve().parent.parent/'examples'/'sft_lora.yaml'
    args = [str(FTTK), 'train', str(example), 'max_steps=2', 'max_samples=8', 'per_device_train_batch_size=4', 'save_steps=1', 'output_dir=run']
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'sft: 100%' in r.stderr and 'loss=' in r.stderr          # tqdm: steps, ETA, loss
    assert 'run folder: run; trained model: run/final' in r.stdout
    assert (tmp_path/'run'/'final'/'adapter_model.safetensors').is_file()
    assert [p.name for p in (tmp_path/'run'/'checkpoints').iterdir()] != []
    r = subprocess.run(args[:3] + ['learning_rat=0.1'], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == (f"fttk: error: unknown key 'learning_rat' in {example} (stage sft); "
                                              "did you mean 'learning_rate'?\n")
