"""Roofline: peak MAC/s from ISA flags, cores and clock, and the achieved fraction, by hand."""

from __future__ import annotations

import pytest

from compactai.measure.roofline import clock_ghz, peak, roofline


def test_peak_follows_the_flags_cores_and_clock():
    avx2 = peak(1, flags={"avx", "avx2", "fma"}, ghz=2.5)
    assert (avx2["fp32_macs_per_cycle"], avx2["int8_macs_per_cycle"]) == (16, 32)
    assert avx2["fp32_peak_gmacs"] == pytest.approx(16 * 1 * 2.5)  # 40 GMAC/s
    assert avx2["int8_peak_gmacs"] == pytest.approx(32 * 1 * 2.5)
    vnni = peak(1, flags={"avx2", "fma", "avx512f", "avx512_vnni"}, ghz=3.0)
    assert (vnni["fp32_macs_per_cycle"], vnni["int8_macs_per_cycle"]) == (32, 128)
    assert "MACs per cycle per core x cores x clock" in vnni["formula"]


def test_achieved_fraction_of_peak_by_hand():
    # 2e8 MACs per item x 50 items/s = 10 GMAC/s against 40 GMAC/s fp32 peak = 25%; int8 peak 80 -> 12.5%
    fp32 = roofline(200_000_000, 50.0, 1, int8=False, flags={"avx2", "fma"}, ghz=2.5)
    assert fp32["achieved_gmacs"] == pytest.approx(10.0) and fp32["fraction_of_peak"] == pytest.approx(0.25)
    int8 = roofline(200_000_000, 50.0, 1, int8=True, flags={"avx2", "fma"}, ghz=2.5)
    assert int8["precision"] == "int8" and int8["fraction_of_peak"] == pytest.approx(0.125)
    assert roofline(None, 50.0, 1, int8=False, ghz=2.5)["fraction_of_peak"] is None


def test_clock_is_read_from_this_machine():
    ghz, source = clock_ghz()
    assert source != "unknown" and ghz is not None and 0.2 < ghz < 10


def test_above_the_textbook_peak_says_the_clock_reading_is_low():
    # 2e8 MACs x 250 items/s = 50 GMAC/s against 40 at the 2.5 GHz given: the cores ran at >= 3.125 GHz
    above = roofline(200_000_000, 250.0, 1, int8=False, flags={"avx2", "fma"}, ghz=2.5)
    assert above["fraction_of_peak"] == pytest.approx(1.25)
    assert "3.12 GHz or more" in above["caveat"] and "boost clock" in above["caveat"]
    assert roofline(200_000_000, 50.0, 1, int8=False, flags={"avx2", "fma"}, ghz=2.5)["caveat"] is None
