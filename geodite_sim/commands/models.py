"""``geodite-sim models``: the packaged models with their model cards."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the packaged models and their model cards",
                       description="List the models shipped with the package (load_model names), the default, "
                                   "and each one's model card (teacher, energy convention, elements, metrics).",
                       allow_abbrev=False)
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geodite_sim.model.registry import DEFAULT_MODEL, PACKAGED_MODELS, load_model

    cards = {}
    for name in PACKAGED_MODELS:
        model = load_model(name)
        cards[name] = {"default": name == DEFAULT_MODEL, "parameters": sum(p.numel() for p in model.parameters()),
                       "elements": None if model.supported_elements is None else len(model.supported_elements),
                       "card": model.card}
    if args.json:
        print(json.dumps(cards, indent=1))
        return 0
    for name, info in cards.items():
        card = info["card"] or {}
        teacher = (card.get("teacher") or {}).get("version", "—")
        print(f"{name}{' (default)' if info['default'] else ''}: {info['parameters']:,} parameters, "
              f"{info['elements'] or 'all'} elements; teacher: {teacher}")
        if card.get("energy_convention"):
            print(f"    energies: {card['energy_convention']}")
        for k, v in (card.get("metrics") or {}).items():
            print(f"    {k}: {v}")
    return 0
