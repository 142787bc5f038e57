"""The import graph: no module imports itself through others, and the packages form layers that only
import downwards (the tree reads as the lifecycle, and each stage's core can be used without the layers
that deliver it)."""

from __future__ import annotations

import itertools

import grimp
import pytest

# Top to bottom: a package may import the ones below it, never one above. Names in one tuple are siblings
# that must not import each other.
LAYERS = (
    "cli",
    "demo",
    "serve",
    "assistant",
    "feedback",
    "training",
    "evaluate",
    "models",
    "registry",
    "db",
    ("data", "privacy"),
    "config",
    "profiling",
    ("errors", "atomic"),
)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("tuneloop")


def test_no_module_is_part_of_an_import_cycle(graph):
    modules = sorted(graph.modules)
    cycles = [
        (a, b)
        for a, b in itertools.combinations(modules, 2)
        if graph.find_shortest_chain(importer=a, imported=b) and graph.find_shortest_chain(importer=b, imported=a)
    ]
    assert cycles == []


def test_packages_only_import_the_layers_below_them(graph):
    layers = [
        grimp.Layer(*layer, independent=True) if isinstance(layer, tuple) else grimp.Layer(layer) for layer in LAYERS
    ]
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers, containers={"tuneloop"})
    assert not illegal, [(d.importer, d.imported, [r.heads for r in d.routes]) for d in illegal]


def test_every_package_has_a_layer(graph):
    named = {name for layer in LAYERS for name in (layer if isinstance(layer, tuple) else (layer,))}
    children = {module.split(".")[1] for module in graph.find_children("tuneloop")}
    assert children - named <= {"__main__"}
