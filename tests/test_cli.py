import json
import subprocess
import sys

import pytest
import timm

from timm_ssb import BASELINES
from timm_ssb.cli import main
from timm_ssb.complexity import model_complexity


def test_models_json(capsys):
    assert main(['models', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['model'] for r in rows] == timm.list_models('ssb_*')
    assert {r['model']: r['baseline'] for r in rows} == {**BASELINES, 'ssb_resnet': 'resnet50d'}
    by_name = {r['model']: r for r in rows}
    r50 = by_name['ssb_resnetd50']
    assert r50['baseline'] == 'resnet50d'
    assert r50['gmacs'] == pytest.approx(model_complexity('ssb_resnetd50').gmacs)
    assert r50['baseline_gmacs'] == pytest.approx(model_complexity('resnet50d').gmacs)
    assert (r50['paper_gmacs'], r50['paper_params_m']) == (2.95, 25.6)
    assert (r50['baseline_paper_gmacs'], r50['baseline_paper_params_m']) == (4.3, 25.6)
    assert by_name['ssb_resnetrs152']['paper_gmacs'] is None
    assert by_name['ssb_resnetd152']['gmacs_ratio'] == pytest.approx(2.09, abs=0.01)
    assert by_name['ssb_resnet']['gmacs'] == pytest.approx(r50['gmacs'])  # its default source is resnet50d
    for name in ('ssb_resnetrs50', 'ssb_resnetrs200', 'ssb_resnetrs420'):
        row = by_name[name]
        assert row['baseline_gmacs'] == pytest.approx(model_complexity(BASELINES[name]).gmacs)
        assert row['gmacs_ratio'] > 1.4 and 0 < row['params_m'] - row['baseline_params_m'] < 0.2


def test_models_table_at_other_size_has_no_paper_column(capsys):
    assert main(['models', '--img-size', '288', 'ssb_resnetd50']) == 0
    out = capsys.readouterr().out
    assert 'ssb_resnetd50     288x288' in out
    line = next(s for s in out.splitlines() if s.startswith('ssb_resnetd50'))
    assert line.split()[3] == '-'  # no paper params at 288


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, '-m', 'timm_ssb.cli', 'models', 'ssb_resnetd152'], capture_output=True, text=True, check=True
    )
    assert 'ssb_resnetd152' in result.stdout and 'resnet152d' in result.stdout


def test_models_lists_those_named_or_matched_in_timms_order(capsys):
    assert main(['models', '--json', 'ssb_resnetd1*', 'ssb_resnetd50']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['model'] for r in rows] == ['ssb_resnetd50', 'ssb_resnetd101', 'ssb_resnetd152']
    assert rows[0]['gmacs'] == pytest.approx(model_complexity('ssb_resnetd50').gmacs)


def test_models_rejects_a_pattern_that_matches_no_ssb_model(capsys):
    message = "timm-ssb models: MODEL 'resnet50d' matches no SSB model; the SSB models are ssb_resnet, "
    with pytest.raises(SystemExit, match=message):
        main(['models', 'ssb_resnetd50', 'resnet50d'])


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        main(['nope'])
    assert exc.value.code == 2


def test_models_rejects_non_positive_size():
    with pytest.raises(SystemExit) as exc:
        main(['models', '--img-size', '0'])
    assert exc.value.code == 2
