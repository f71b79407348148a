"""gpu_memory_utilization as vLLM means it: an engine's share of the device, whatever others
use of the rest (worker/memory.device_share)."""
import logging

from servelm.worker.memory import device_share

GIB = 2**30


def test_two_engines_at_045_share_one_device(caplog):
    # the second engine finds the first one's 45% in use: it still gets its own 45%
    with caplog.at_level(logging.WARNING):
        assert device_share(100 * GIB, 46 * GIB, 0.45) == 45 * GIB
    assert not caplog.records


def test_a_share_beyond_what_others_leave_is_cut_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert device_share(100 * GIB, 20 * GIB, 0.9) == 80 * GIB
    assert "gpu_memory_utilization=0.90 asks for 90.0 GiB" in caplog.text
