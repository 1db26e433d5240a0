"""The store's time axis on hand-made file times: joining a field's files, the times all fields share, the step."""

import numpy as np
import pytest

from lightning_seqpar.weather.data.time_axis import FieldSource, align, field_index, time_step


def days(*values: int) -> np.ndarray:
    return np.datetime64("2000-01-01", "ns") + np.array(values) * np.timedelta64(1, "D")


def test_field_index_joins_files_by_first_time_and_keeps_the_first_copy():
    file_times = [days(3, 4, 5), days(0, 1, 2, 3), days()]  # file 2 holds no time of the field
    sources = [FieldSource(0, "t", None), FieldSource(1, "t", None), FieldSource(2, "t", None)]
    ix = field_index(sources, file_times, "t", "'store'", duplicate=None)
    assert [s.file for s in ix.sources] == [1, 0]  # sorted by first time, the empty file left out
    np.testing.assert_array_equal(ix.times, days(0, 1, 2, 3, 4, 5))
    assert ix.source_of.tolist() == [0, 0, 0, 0, 1, 1] and ix.local.tolist() == [0, 1, 2, 3, 1, 2]  # day 3 of file 1


def test_field_index_refuses_duplicates_and_empty_fields():
    file_times = [days(0, 1), days(1, 2)]
    sources = [FieldSource(0, "t", None), FieldSource(1, "t", None)]
    seen = []

    def duplicate(file, clash, srcs):
        seen.append((file, clash.tolist(), len(srcs)))
        return "files overlap"

    with pytest.raises(ValueError, match="files overlap"):
        field_index(sources, file_times, "t", "'store'", duplicate)
    assert seen == [(1, days(1).tolist(), 2)]
    with pytest.raises(ValueError, match=r"t has no times in 'store' \(its time axis is empty\)"):
        field_index([FieldSource(0, "t", None)], [days()], "t", "'store'", None)


def test_align_keeps_the_common_times_and_narrows_every_field():
    a = field_index([FieldSource(0, "a", None)], [days(0, 1, 2, 3)], "a", "'s'", None)
    b = field_index([FieldSource(0, "b", None)], [days(1, 2, 3, 4)], "b", "'s'", None)
    common = align({"a": a, "b": b}, "'s'")
    np.testing.assert_array_equal(common, days(1, 2, 3))
    assert a.local.tolist() == [1, 2, 3] and b.local.tolist() == [0, 1, 2]
    c = field_index([FieldSource(0, "c", None)], [days(3, 9)], "c", "'s'", None)
    with pytest.raises(ValueError, match=r"the fields of 's' share 1 times; a forecast needs at least two"):
        align({"a": a, "c": c}, "'s'")


def test_time_step_allows_gaps_and_file_boundaries_but_not_odd_steps():
    ix = field_index([FieldSource(0, "t", None), FieldSource(1, "t", None)], [days(0, 2, 6), days(7, 9)], "t", "'s'",
                     None)
    assert time_step(ix.times, ix, "'s'") == np.timedelta64(2, "D")  # the 1-day step crosses a file boundary
    odd = field_index([FieldSource(0, "t", None)], [days(0, 2, 5)], "t", "'s'", None)
    with pytest.raises(ValueError, match=r"time axis of 's' is irregular: steps \['4320 minutes'\]"):
        time_step(odd.times, odd, "'s'")
