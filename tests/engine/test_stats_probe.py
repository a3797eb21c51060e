"""CBNStatsProbeHook's pieces: the large-batch truth and the error measure."""
import copy

import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from cbn_mmdet.engine.stats_probe import estimate_errors, large_batch_statistics


def test_large_batch_truth_is_the_concatenated_batches_through_current_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window=3),
                          nn.ReLU(), nn.Conv2d(4, 5, 1), CrossIterationBatchNorm2d(5, window=3))
    batches = [torch.randn(2, 3, 6, 6) + i for i in range(3)]
    for x in batches:  # fill the windows
        model(x).sum().backward()
    state = copy.deepcopy(model.state_dict())
    big = torch.cat(batches)
    truth = large_batch_statistics(model, ['1', '4'], lambda m: m(big))
    with torch.no_grad():
        y1 = model[0](big).double()
        torch.testing.assert_close(truth['1'][0], y1.mean((0, 2, 3)))
        torch.testing.assert_close(truth['1'][1], y1.var((0, 2, 3), unbiased=False))
        # downstream of a norm, the truth uses the large batch's statistics upstream
        h = nn.functional.batch_norm(model[0](big), None, None, model[1].weight, model[1].bias,
                                     True, 0.0, model[1].eps)
        y4 = model[3](torch.relu(h)).double()
        torch.testing.assert_close(truth['4'][0], y4.mean((0, 2, 3)))
    for k, v in model.state_dict().items():  # the probe works on a copy
        torch.testing.assert_close(v, state[k])


def test_estimate_errors_units():
    mean, var = torch.zeros(3, dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64)
    m_err, v_err = estimate_errors(mean + 1.0, var * 1.5, mean, var, eps=0.0)
    assert abs(m_err - 0.5) < 1e-12 and abs(v_err - 0.5) < 1e-12
