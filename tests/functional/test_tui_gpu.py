"""The GPU panel, device moves and the fine-tune estimate in the explorer (simulated GPUs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from textual.geometry import Region

from modelscope_tui.gpu.simulated import SimulatedBackend
from modelscope_tui.gpu.snapshot import HostMemory
from modelscope_tui.training import estimate as estimate_mod
from modelscope_tui.training import placement as placement_mod
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.screens.device import DeviceScreen
from modelscope_tui.tui.widgets.gpu_panel import GpuPanel

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"


def panel_text(app) -> str:
    panel = app.query_one("#gpu-panel", GpuPanel)
    from rich.console import Console

    console = Console(width=max(20, panel.size.width - 2), record=True, file=open("/dev/null", "w"))
    console.print(panel.render_panel())
    return console.export_text()


async def wait_for_sample(pilot, predicate=lambda s: True, tries: int = 400):
    app = pilot.app
    for _ in range(tries):
        sample = app.query_one("#gpu-panel", GpuPanel).sample
        if sample is not None and predicate(sample):
            return sample
        await pilot.pause(0.05)
    raise AssertionError("no GPU sample arrived")


async def started(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def test_panel_shows_simulated_gpus_and_estimate(monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "3")
    app = MscopeApp(SAMPLES / "transformer_tied.pt", gpu_interval=0.05, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        await wait_for_sample(pilot, lambda s: len(s.gpus) == 3)
        await pilot.pause(0.2)
        text = panel_text(app)
        assert "SIMULATED" in text
        for i in range(3):
            assert f"GPU {i} (cuda:{i})" in text
        assert "fine-tune estimate" in text and "bf16" in text and "fits" in text
        before = text
        await pilot.press("t")
        await pilot.pause()
        assert panel_text(app) != before
        # freezing everything removes gradients and optimizer state from the estimate
        await pilot.press("F")
        await pilot.pause()
        assert "trains 0 of" in panel_text(app)
        await pilot.press("g")
        assert app.monitor is None and not app.query_one("#gpu-panel").display


async def test_freeze_with_panel_open_estimates_once_and_draws_with_the_tree(monkeypatch):
    """Issue #14: a freeze with the panel open computes the estimate once, in the action itself,
    and asks for one panel repaint there (the tree's frame), not a second one when a worker
    reports: that second full pass doubled the time of freezing 50k tensors."""
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / "transformer_tied.pt", gpu_interval=3600, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        await wait_for_sample(pilot)
        await pilot.pause()
        panel = app.query_one("#gpu-panel", GpuPanel)
        assert "fine-tune estimate" in panel_text(app) and "trains 0 of" not in panel_text(app)
        computed, repaints = [], []
        real_estimate, real_refresh = estimate_mod.estimate_for_session, panel.refresh
        monkeypatch.setattr(
            estimate_mod, "estimate_for_session", lambda *a, **k: computed.append(a) or real_estimate(*a, **k)
        )
        monkeypatch.setattr(panel, "refresh", lambda *a, **k: repaints.append(a) or real_refresh(*a, **k))
        app.action_freeze_all()  # what F runs; nothing has yielded to the event loop yet
        assert len(computed) == 1 and len(repaints) == 1
        assert "trains 0 of" in panel_text(app)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert len(computed) == 1 and len(repaints) == 1  # and nothing more came after the frame
        assert "trains 0 of" in panel_text(app)


async def test_panel_repaints_only_changed_rows_below_a_wrapped_line(monkeypatch):
    """A line wider than the panel (here the placement line; without a driver, the status and
    host RAM lines) wraps: the estimate lines under it are still repainted where Textual put
    them, and only those rows, so the screen matches a full repaint."""
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / "transformer_tied.pt", gpu_interval=3600, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        await wait_for_sample(pilot)
        panel = app.query_one("#gpu-panel", GpuPanel)
        panel.placement_line = "placed: " + " ".join(["cuda:0 1.0 GiB"] * 8)  # three rows or more
        panel.refresh_panel()
        await pilot.pause()

        def on_screen() -> list[str]:
            return [strip.text for strip in panel.render_lines(Region(0, 0, *panel.outer_size))]

        regions = []
        real_refresh = panel.refresh
        monkeypatch.setattr(panel, "refresh", lambda *a, **k: regions.append(a) or real_refresh(*a, **k))
        before = on_screen()
        app.session.freeze(app.session.match("blocks.0.*"))  # the panel keeps its lines: a partial repaint
        app.refresh_state()
        await pilot.pause()
        partial = on_screen()
        assert len(regions) == 1 and 0 < len(regions[0]) < panel.size.height // 2, regions
        assert partial != before
        real_refresh()
        await pilot.pause()
        assert on_screen() == partial


async def test_panel_without_driver_says_so_and_shows_host_ram(monkeypatch):
    monkeypatch.delenv("MSCOPE_SIMULATE_GPUS", raising=False)
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", gpu_interval=0.05, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        sample = await wait_for_sample(pilot)
        text = " ".join(panel_text(app).split())
        if sample.ok:  # a machine with a real GPU
            assert "GPU 0" in text
        else:
            assert sample.status in text and "host RAM" in text
            assert "Traceback" not in text


async def test_lost_gpu_is_reported_and_others_continue(monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "2")
    monkeypatch.setenv("MSCOPE_SIMULATE_GPU_LOST", "1:2")
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", gpu_interval=0.05, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        await wait_for_sample(pilot, lambda s: any(g.lost for g in s.gpus))
        text = panel_text(app)
        assert "lost" in text and "GPU 0 (cuda:0)" in text


async def test_narrow_terminal_collapses_to_one_line_per_gpu(monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "2")
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", gpu_interval=0.05, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await pilot.press("g")
        panel = app.query_one("#gpu-panel", GpuPanel)
        assert panel.display and panel.compact
        await wait_for_sample(pilot)
        lines = [line for line in panel_text(app).splitlines() if line.startswith("GPU")]
        assert len(lines) == 2 and all(len(line) <= 24 for line in lines)


async def test_move_whole_model_to_cpu_shows_device_column():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("m")
        await app.workers.wait_for_complete()  # the device list is made on a worker (torch import)
        await pilot.pause()
        assert isinstance(app.screen, DeviceScreen)
        option_list = app.screen.query_one("OptionList")
        ids = [option_list.get_option_at_index(i).id for i in range(option_list.option_count)]
        option_list.highlighted = ids.index("cpu")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        placement = app.mover.placement
        assert placement is not None
        assert {placement.device_of(t.name) for t in app.session.ckpt.model_tensors} == {"cpu"}
        assert "cpu 85.0 KiB" in str(app.query_one("#header").render())
        assert "device" in str(app.query_one("#columns").render())
        unavailable = [o for o in ids if o.startswith("cuda")]
        assert unavailable  # listed, with the reason, but disabled
        assert option_list.get_option(unavailable[0]).disabled


async def test_out_of_memory_move_rolls_back(monkeypatch):
    def oom(host, target):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(placement_mod, "_transfer", oom)
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("m")
        await app.workers.wait_for_complete()  # the device list is made on a worker (torch import)
        await pilot.pause()
        option_list = app.screen.query_one("OptionList")
        ids = [option_list.get_option_at_index(i).id for i in range(option_list.option_count)]
        option_list.highlighted = ids.index("cpu")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        messages = " ".join(n.message for n in app._notifications)
        assert "out of memory on cpu: needed" in messages and "nothing was moved" in messages
        assert not app.mover.placement.device


FIXED_HOST = HostMemory(64 << 30, 48 << 30, 300 << 20)


def fixed_sample():
    backend = SimulatedBackend(2, seed=0, host=FIXED_HOST, clock=lambda: 1_700_000_000.0, visible=None)
    sample = backend.sample()
    gpus = tuple(
        dataclasses.replace(g, processes=tuple(dataclasses.replace(p, pid=1000 + i) for i, p in enumerate(g.processes)))
        for g in sample.gpus
    )
    return dataclasses.replace(sample, gpus=gpus)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_gpu_panel_snapshot(snap_compare, size, monkeypatch):
    monkeypatch.chdir(ROOT)
    app = MscopeApp("sample_models/transformer_tied.pt", show_gpus=False)

    async def run_before(pilot):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        panel = pilot.app.query_one("#gpu-panel", GpuPanel)
        panel.display = True
        panel.compact = size[0] < 100
        sample = fixed_sample()
        panel.histories = {g.nvml_index: [int(g.memory_total * f / 10) for f in range(1, 9)] for g in sample.gpus}
        panel.sample = sample
        pilot.app.update_estimate()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def test_export_device_map_after_move(tmp_path):
    import json

    src = tmp_path / "model.pt"
    src.write_bytes((SAMPLES / "transformer_tied.pt").read_bytes())
    app = MscopeApp(src, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        app.tree.reveal(module_name="blocks")
        await pilot.pause()
        await pilot.press("m")
        await app.workers.wait_for_complete()  # the device list is made on a worker (torch import)
        await pilot.pause()
        option_list = app.screen.query_one("OptionList")
        ids = [option_list.get_option_at_index(i).id for i in range(option_list.option_count)]
        option_list.highlighted = ids.index("meta")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("D", "enter")
        await pilot.pause()
    device_map = json.loads((tmp_path / "model.device-map.json").read_text())
    assert device_map["blocks"] == "meta"
    assert all(v == "cpu" for k, v in device_map.items() if k != "blocks")


async def test_cast_copy_and_cpu_copy_from_the_explorer(tmp_path):
    import torch

    from modelscope_tui.tui.screens.confirm import ConfirmScreen

    src = tmp_path / "model.pt"
    src.write_bytes((SAMPLES / "cnn_state_dict.pt").read_bytes())
    app = MscopeApp(src, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("P")
        assert isinstance(app.screen, ConfirmScreen)
        assert "bf16: 6.5 KiB → 3.3 KiB" in " ".join(str(b.label) for b in app.screen.query("Button"))
        await pilot.click("#bfloat16")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("C")  # stored on cpu already: says so, writes nothing
        await pilot.pause()
        messages = " ".join(n.message for n in app._notifications)
        assert "already stored for the CPU" in messages
    out = torch.load(tmp_path / "model.bf16.pt", weights_only=True)
    ref = torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)
    assert out["features.0.weight"].dtype == torch.bfloat16
    assert torch.equal(out["features.0.weight"], ref["features.0.weight"].to(torch.bfloat16))
    assert out["features.1.num_batches_tracked"].dtype == torch.int64


async def test_idle_gpu_costs_no_repaints(monkeypatch):
    """Seen on a real H200: an idle GPU reports the same figures tick after tick, and repainting
    the panel anyway (a compositor pass each time) put the idle explorer at 1-2% of a core.
    Once the sparkline is full, ticks that change nothing on screen must not repaint."""
    import time

    from modelscope_tui.gpu.monitor import GpuMonitor

    class StillBackend(SimulatedBackend):
        def sample(self):
            if not hasattr(self, "_first"):
                self._first = super().sample()
            return dataclasses.replace(self._first, timestamp=time.time())

    monkeypatch.setattr(
        GpuMonitor,
        "from_env",
        classmethod(lambda cls, env=None, **kw: cls(StillBackend(1, seed=0), **kw)),
    )
    app = MscopeApp(SAMPLES / "transformer_tied.pt", gpu_interval=0.02, show_gpus=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot)
        panel = app.query_one("#gpu-panel", GpuPanel)
        width = panel.size.width
        await wait_for_sample(pilot)
        while len(app.monitor.memory_history(0)) < width + 5:  # the sparkline is full
            await pilot.pause(0.05)
        repaints = []
        monkeypatch.setattr(panel, "refresh", lambda *a, **k: repaints.append(1))
        ticks = app.monitor.ticks
        while app.monitor.ticks < ticks + 20:
            await pilot.pause(0.05)
        assert not repaints, f"{len(repaints)} repaints in 20 idle ticks"
        # a change on screen still repaints at once
        panel.placement_line = "placed: cuda:0 1.0 GiB"
        panel.refresh_panel()
        assert repaints


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
async def test_panel_uses_the_room_it_has_and_always_says_simulated(monkeypatch, size):
    """200 columns: the panel grows, so the GPU's full name sits on one line and process names are
    not cut; 80 columns: one line per GPU, and simulated figures still say so."""
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / "transformer_tied.pt", gpu_interval=0.05, show_gpus=True)
    async with app.run_test(size=size) as pilot:
        await started(pilot)
        await wait_for_sample(pilot)
        await pilot.pause(0.2)
        from rich.console import Console

        panel = app.query_one("#gpu-panel", GpuPanel)
        console = Console(width=panel.size.width, record=True, file=open("/dev/null", "w"))
        console.print(panel.render_panel())
        lines = console.export_text().splitlines()  # as wide as the panel's content on screen
        assert any("SIMULATED" in line for line in lines[:2]), lines[:3]
        if size[0] >= 200:
            assert any(line.startswith("GPU 0 (cuda:0) SIMULATED NVIDIA H100 80GB HBM3") for line in lines), lines
            assert any("SIMULATED python" in line for line in lines), lines


def test_first_move_imports_torch_off_the_ui_thread():
    """The first `m` froze the screen ~2 s while torch imported: now the device list is made on a
    worker and the user sees "loading torch…". Needs a fresh interpreter (torch not imported)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from modelscope_tui.tui.app import MscopeApp
        from modelscope_tui.tui.screens.device import DeviceScreen
        async def main():
            app = MscopeApp({str(SAMPLES / "cnn_state_dict.pt")!r}, show_gpus=False)
            async with app.run_test(size=(120, 36)) as pilot:
                await app.workers.wait_for_complete()
                await pilot.pause()
                assert "torch" not in sys.modules, "torch imported before m"
                await pilot.press("m")
                print("notified", any("loading torch" in n.message for n in app._notifications))
                await app.workers.wait_for_complete()
                await pilot.pause()
                print("devices", isinstance(app.screen, DeviceScreen))
        asyncio.run(main())
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "notified True" in run.stdout and "devices True" in run.stdout, run.stdout + run.stderr[-2000:]


def test_a_panel_with_no_width_repaints_whole_instead_of_wrapping_into_zero_columns():
    """A sample can arrive while the panel is hidden for room (80 columns): width 0. Measuring a
    long line's wrapped height at width 0 raised inside rich (range() arg 3 must not be zero)."""
    from rich.text import Text

    from modelscope_tui.tui.widgets.gpu_panel import GpuPanel

    panel = GpuPanel()  # not mounted: size 0 x 0, as a hidden panel
    panel._shown = (0, Text("short\n" + "a long line " * 10))
    before = Text("short\n" + "a long line " * 10 + "\nold")
    after = Text("short\n" + "a long line " * 10 + "\nnew")
    assert panel._changed_lines(before, after) == []
