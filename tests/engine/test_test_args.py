"""tools/test.py's options change the config as MMDetection's tools/test.py does (--show,
--show-dir and --wait-time through mmdet's trigger_visualization_hook). That --show-dir writes
the painted images is tested end to end in test_train_resume_test.py."""
import pytest

from tests.helpers import QUICKSTART
from tools.test import apply_test_args, load_config, parse_args


def _cfg(*extra, drop_visualization=False):
    args = parse_args([QUICKSTART, 'work/epoch_1.pth', *extra])
    cfg = load_config(args)
    if drop_visualization:
        del cfg.default_hooks['visualization']
    return apply_test_args(cfg, args)


def _hook(cfg):
    """default_hooks.visualization, less the ``_scope_`` of mmdet's base config."""
    return {k: v for k, v in cfg.default_hooks.visualization.items() if k != '_scope_'}


def test_no_show_options_leave_the_visualization_hook_off():
    cfg = _cfg()
    assert cfg.load_from == 'work/epoch_1.pth'
    assert _hook(cfg) == dict(type='DetVisualizationHook')  # draw=False
    assert parse_args([QUICKSTART, 'x.pth']).wait_time == 2  # mmdet's default


def test_show_turns_on_drawing_and_showing_with_the_wait_time():
    hook = _hook(_cfg('--show', '--wait-time', '0.5'))
    assert hook == dict(type='DetVisualizationHook', draw=True, show=True, wait_time=0.5)


def test_show_dir_turns_on_drawing_into_that_directory():
    hook = _hook(_cfg('--show-dir', 'painted'))
    assert hook == dict(type='DetVisualizationHook', draw=True, test_out_dir='painted')


def test_the_configured_hook_builds_with_show_without_opening_a_window():
    """mmdet's DetVisualizationHook accepts what --show sets (a window opens only when it
    draws a test batch, which this test never runs)."""
    from mmdet.registry import HOOKS, VISUALIZERS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = _cfg('--show', '--wait-time', '0.25', '--show-dir', 'painted')
    VISUALIZERS.build(dict(cfg.visualizer, name='test_args_visualizer'))
    with pytest.warns(UserWarning, match='The show is True'):
        hook = HOOKS.build(cfg.default_hooks.visualization)
    assert (hook.draw, hook.show, hook.wait_time, hook.test_out_dir) == (True, True, 0.25, 'painted')


@pytest.mark.parametrize('option', [['--show'], ['--show-dir', 'painted']])
def test_without_a_visualization_hook_the_show_options_fail_as_in_mmdet(option):
    with pytest.raises(RuntimeError, match='VisualizationHook must be included in default_hooks'):
        _cfg(*option, drop_visualization=True)
    _cfg(drop_visualization=True)  # without the options the hook is not needed
