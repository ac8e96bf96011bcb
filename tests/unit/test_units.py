"""Sizes in one convention: binary values with their IEC names, everywhere text shows a size."""

from __future__ import annotations

import pytest

from modelscope_tui.units import fmt_bytes, fmt_bytes_short


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),  # 1023.999 KiB rounds up to the next unit, never "1024.0 KiB"
        (int(1.3 * 2**30), "1.3 GiB"),
        (675 * 2**20 + 2**19, "675.5 MiB"),
        (3 * 2**40, "3.0 TiB"),
        (5000 * 2**40, "5000.0 TiB"),
    ],
)
def test_fmt_bytes_is_binary_with_iec_names(n, text):
    assert fmt_bytes(n) == text


def test_short_form_keeps_the_unit_names():
    assert fmt_bytes_short(413 * 2**20) == "413 MiB"
    assert fmt_bytes_short(int(1.6 * 2**30)) == "1.6 GiB"
    assert fmt_bytes_short(85 * 2**10 + 100) == "85 KiB"
    assert fmt_bytes_short(526) == "526 B"
