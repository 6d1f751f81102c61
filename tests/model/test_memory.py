import torch

from ldeq_fast.memory import PeakTensorMemory, peak_memory_bytes

MB = 2 ** 20


def test_peak_counts_live_storages_not_views_or_in_place_results():
    with PeakTensorMemory() as m:
        a = torch.ones(MB // 4)            # 1 MB
        b = a * 2                          # 2 MB live
        view = b[:10]
        b.add_(1)                          # in place: nothing new
        del a                              # 1 MB live
        c = torch.ones(MB // 8)            # 1.5 MB live
    assert m.peak_bytes == 2 * MB
    assert m.live_bytes == MB + MB // 2
    del view, b, c


def test_storage_stays_live_while_a_view_of_it_does():
    with PeakTensorMemory() as m:
        a = torch.ones(MB // 4)
        part = a.exp()[:1]                 # the exp result lives on through its view
        del a
        d = torch.ones(MB // 4)
    assert m.live_bytes == 2 * MB          # exp's storage (through the view) and d
    del part
    assert m.live_bytes == MB
    del d


def test_backward_allocations_are_counted():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(64, 512)
    peak = peak_memory_bytes(lambda: (x @ w).tanh().sum().backward(), "cpu")
    assert peak >= w.numel() * 4           # at least the weight's gradient
