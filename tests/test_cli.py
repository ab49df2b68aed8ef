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
    png = out/'plots'/'pretraining.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    assert json.loads((out/'fingerprint.json').read_text())['data_hash']
