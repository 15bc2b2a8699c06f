import torch

from trainlab.memory.allocations import PeakTensorMeter


def test_peak_counts_live_allocations_once_and_releases_them():
    keep = torch.zeros(10)  # alive before the block: not counted
    with PeakTensorMeter(record_at_least=4000) as meter:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # shares a's storage: no new allocation
        b = a * 2  # 8000 live
        del b  # back to 4000
        c = torch.ones(10)  # 4040 live, peak stays 8000
        keep.add_(1)  # in place on an outside tensor: nothing new
    assert meter.peak_bytes == 8000
    assert meter.live_bytes == 4040
    assert meter.largest == ((1000,), 4000)
    assert meter.shapes == [(1000,), (1000,)]
    assert meter.bytes_by_op["ones.default"] == 4040 and meter.bytes_by_op["mul.Tensor"] == 4000
    del a, view
    assert meter.live_bytes == 40
    assert c.shape == (10,)
