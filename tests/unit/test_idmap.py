"""The userns ID map arithmetic, checked against moby's ``pkg/idtools`` rules."""

from __future__ import annotations

import pytest

from snapdriver.errors import ConfigError
from snapdriver.layers.idmap import IDMapError, IDMapping, IDRange

TYPICAL = IDMapping.create([IDRange(0, 100000, 65536)], [IDRange(0, 100000, 65536)])


def mapping() -> IDMapping:
    assert TYPICAL is not None
    return TYPICAL


def test_no_ranges_is_no_mapping() -> None:
    assert IDMapping.create([], []) is None
    assert IDMapping.decode({}) is None
    assert IDMapping.decode({"uid_maps": None, "gid_maps": None}) is None


@pytest.mark.parametrize(
    ("container", "host"), [(0, 100000), (1000, 101000), (65534, 165534), (65535, 165535)]
)
def test_typical_map_both_ways(container: int, host: int) -> None:
    assert mapping().to_host(container, container) == (host, host)
    assert mapping().to_container(host, host) == (container, container)


def test_several_ranges_and_separate_gids() -> None:
    idmap = IDMapping.create(
        [IDRange(0, 500000, 1000), IDRange(1000, 700000, 10)],
        [IDRange(0, 800000, 2000)],
    )
    assert idmap is not None
    assert idmap.root == (500000, 800000)
    assert idmap.to_host(999, 1999) == (500999, 801999)
    assert idmap.to_host(1005, 5) == (700005, 800005)
    assert idmap.to_container(700009, 800000) == (1009, 0)
    with pytest.raises(IDMapError, match="Container UID 1010 cannot be mapped to a host UID"):
        idmap.to_host(1010, 0)
    with pytest.raises(IDMapError, match="Container GID 2000 cannot be mapped to a host GID"):
        idmap.to_host(0, 2000)
    with pytest.raises(IDMapError, match="Host UID 600000 cannot be mapped to a container UID"):
        idmap.to_container(600000, 800000)
    with pytest.raises(IDMapError, match="Host GID 0 cannot be mapped to a container GID"):
        idmap.to_container(500000, 0)


def test_ids_outside_the_map_are_errors() -> None:
    with pytest.raises(IDMapError, match="Container UID 65536 "):
        mapping().to_host(65536, 0)
    with pytest.raises(IDMapError, match="Host UID 0 "):
        mapping().to_container(0, 100000)  # a file the host's root made in the layer


def test_the_remapped_root_passes_unchanged_on_the_way_in() -> None:
    """moby's ToHost leaves an ID equal to the remapped root's alone (outside the map or not)."""
    assert mapping().to_host(100000, 100000) == (100000, 100000)


def test_only_uid_ranges_leave_gids_as_they_are() -> None:
    idmap = IDMapping.create([IDRange(0, 100000, 65536)], [])
    assert idmap is not None
    assert idmap.root == (100000, 0)
    assert idmap.to_host(5, 7) == (100005, 7)
    assert idmap.to_container(100005, 7) == (5, 7)


def test_a_map_without_container_root_is_refused() -> None:
    with pytest.raises(ConfigError, match="do not map container root"):
        IDMapping.create([IDRange(1, 100000, 10)], [IDRange(0, 100000, 10)])


@pytest.mark.parametrize("bad", [(-1, 0, 1), (0, -5, 1), (0, 0, 0)])
def test_bad_ranges_are_refused(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError):
        IDRange(*bad)


def test_encode_decode_round_trip() -> None:
    assert IDMapping.decode(mapping().encode()) == mapping()
    with pytest.raises(ConfigError, match="malformed"):
        IDMapping.decode({"uid_maps": [{"container_id": 0}]})
