"""The study tools run from their command and write what they promise (tiny settings)."""
import csv
import json
import os.path as osp

import pytest

from tools.studies.positions_per_statistic import deepest_positions, main


def test_deepest_positions_follow_the_network_strides():
    assert deepest_positions(8, 1) == 4 and deepest_positions(16, 2) == 32


@pytest.mark.integration
def test_positions_study_writes_results_and_plot(tmp_path):
    main(['--sizes', '8', '--batches', '16', '4', '--norms', 'BN', 'CBN', '--seeds', '0',
          '--epochs', '1', '--jobs', '1', '--out', str(tmp_path)])
    with open(tmp_path / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert {(r['batch'], r['norm']) for r in rows} == {('16', 'BN'), ('16', 'CBN'), ('4', 'BN'), ('4', 'CBN')}
    for r in rows:
        assert int(r['m']) == 4 * int(r['batch'])
        assert int(r['pooled']) == int(r['m']) * (4 if r['norm'] == 'CBN' else 1)
        assert 0.0 <= float(r['test_acc']) <= 1.0
    summary = json.loads((tmp_path / 'results.json').read_text())['summary']
    assert len(summary) == 4 and all(s['seeds'] == 1 for s in summary)
    assert osp.getsize(tmp_path / 'accuracy_vs_positions.png') > 10_000


@pytest.mark.integration
def test_classification_study_reports_precise_statistics(tmp_path):
    from tools.studies.digits_classification import main as classification
    classification(['--batches', '16', '--norms', 'BN', 'GN', 'CBN', '--seeds', '0', '--epochs', '1',
                    '--size', '8', '--precise', '100', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'results.json').read_text())
    assert set(result['mean_test_acc_precise']) == {'BN@16', 'GN@16', 'CBN@16'}
    gn = [r for r in result['rows'] if r['norm'] == 'GN'][0]
    assert gn['test_acc_precise'] == gn['test_acc']  # no BN-family layer: nothing changes
    assert all(0.0 <= r['test_acc_precise'] <= 1.0 for r in result['rows'])
