"""benchmarks/kernel_variants.py's A/B settings and the mode precompile_triton.py compiles by default."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_variants as kv  # noqa: E402
import precompile_triton as pre  # noqa: E402

from quantbridge.kernels import int4_configs as kc  # noqa: E402
from quantbridge.kernels import int4_settings as settings  # noqa: E402
from quantbridge.kernels import int4_triton as kt  # noqa: E402
from quantbridge.kernels import int4_wgmma as ws  # noqa: E402


def test_every_variant_setting_is_one_the_settings_module_holds():
    for name, values in kv.VARIANTS.items():
        for key in values:
            assert hasattr(settings, key), (name, key)
            kv.current(key)
    with pytest.raises(AttributeError):
        kv.current("FIXUP_ROWZ")


def test_default_mode_is_the_kernels_own_settings():
    """The mode precompile_triton compiles without --modes: the variant whose every setting is the
    modules' default (it once looked the wgmma settings up on the Triton module and raised)."""
    mode = pre.default_mode()
    assert mode is not None
    assert all(kv.current(key) == value for key, value in kv.VARIANTS[mode].items())


def test_apply_sets_each_setting_on_the_settings_module_and_refuses_a_name_it_lacks(monkeypatch):
    for key in ("SZ_SPLIT", "WGMMA_WS", "FIXUP_ROWS", "RELEASE_LAG"):
        monkeypatch.setattr(settings, key, getattr(settings, key))
    kv._apply({"SZ_SPLIT": True, "FIXUP_ROWS": 16, "RELEASE_LAG": 2, "WGMMA_WS": False})
    assert settings.SZ_SPLIT is True and settings.FIXUP_ROWS == 16 and settings.RELEASE_LAG == 2
    assert settings.WGMMA_WS is False
    # the kernel modules hold no copy that a variant could set instead
    assert not any(hasattr(mod, key) for mod in (kt, ws) for key in ("SZ_SPLIT", "FIXUP_ROWS", "CODE_MODE"))
    with pytest.raises(AttributeError):
        kv._apply({"FIXUP_ROWZ": 16})
    assert not hasattr(settings, "FIXUP_ROWZ")
    assert pre.default_mode() != "operand-tiled-ws"


def test_precompile_lists_each_modes_candidates_under_its_tile_settings(monkeypatch):
    """precompile_triton compiles a mode's candidates as the tuner will try them: the 16-row ws decode
    tiles for a mode with WGMMA_WS_DECODE (and not for its A/B twin), the settings restored after."""
    monkeypatch.setattr(kc, "ws_module", lambda: ws)  # the ws tiles as on a Hopper GPU
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    base, decode = "operand-tiled-ws-fixup16-loads4-graphtimed", "operand-tiled-ws-fixup16-loads4-decode-graphtimed"
    before = (settings.WGMMA_WS_DECODE, settings.FAST_LAUNCH, settings.FIXUP_SLICED)
    jobs = pre._jobs([(8192, 28672)], [1, 4, 16], ["bf16"], 128, [base, decode])
    ws_decode = {mode for mb, cfg, dt, mode in jobs if kc.is_ws(cfg) and cfg[0] == 16}
    assert ws_decode == {decode}
    assert (settings.WGMMA_WS_DECODE, settings.FAST_LAUNCH, settings.FIXUP_SLICED) == before


def test_tune_log_summary_sets_the_best_ws_and_triton_candidates_side_by_side():
    import json
    import random

    import tune_log_summary as tls

    rng = random.Random(7)
    ws_t, tr_t = sorted(rng.uniform(0.02, 0.09) for _ in range(3)), sorted(rng.uniform(0.02, 0.09) for _ in range(3))
    first = [[[128, 128, 128, -128 * (i + 1), 12, 4], t] for i, t in enumerate(reversed(ws_t))] \
        + [[[64, 128, 64, i + 1, 4, 3], t] for i, t in enumerate(tr_t)]
    lines = [json.dumps({"key": "m128-n8192-k8192-x-frd", "timing": "read", "pick": [64, 128, 64, 1, 4, 3],
                         "first_ms": first, "again_ms": []}),
             json.dumps({"key": "m1-n8192-k8192-x", "timing": "do_bench", "pick": [16, 64, 128, 4, 4, 3],
                         "first_ms": [[[16, 64, 128, 4, 4, 3], 0.011]], "again_ms": []})]
    out = tls.summarize(lines)
    assert out[0] == ("m128-n8192-k8192-x-frd  read  pick (64, 128, 64, 1, 4, 3)  "
                      f"best ws (128, 128, 128, -384, 12, 4) {ws_t[0] * 1e3:.1f} us  "
                      f"best triton (64, 128, 64, 1, 4, 3) {tr_t[0] * 1e3:.1f} us")
    assert out[1].endswith("best ws none  best triton (16, 64, 128, 4, 4, 3) 11.0 us")
    assert tls.summarize(lines, "m1-") == out[1:]
