"""PEFT's module targeting, translated into the pattern language so ``explain`` can show it.

Each rule mirrors PEFT's ``check_target_module_exists``: a string target is a full
regex match, a list is exact-or-dotted-suffix; ``layers_to_transform`` filters on the first numbered path
segment (or the first ``layers_pattern`` that matches) and is bypassed by an exact name; ``exclude_modules``
and ``modules_to_save`` always exclude; ``all-linear`` is every Linear/Conv1D but the output head.
``target_parameters`` (LoRA's ParamWrapper) select parameter sites by dotted name, exact or dotted suffix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError
from .ir import ModelHeads
from .sites import PARAMETER
from .spec import Selector

LINEAR_CLASSES = ["Linear", "Conv1D"]


def peft_selector(config: Mapping[str, Any], ops: list[str], heads: ModelHeads, file: str) -> Selector:
    target = config.get("target_modules")
    parameters = config.get("target_parameters")
    if not target and not parameters:
        raise CheckpointError(f"{file}: adapter_config.json has no target_modules")
    if not target:
        chosen = None
    elif isinstance(target, str) and target.lower() == "all-linear":
        head = heads.output_embeddings or (heads.classifier if config.get("task_type") == "SEQ_CLS" else None)
        chosen = Selector(
            op="linear", module_type=LINEAR_CLASSES, exclude=Selector(module=_exact([head])) if head else None
        )
    elif isinstance(target, str):
        chosen = Selector(module=f"re:{target}")
    else:
        chosen = _list_target(list(target), config.get("layers_to_transform"), config.get("layers_pattern"), file)
    module_ops = [op for op in ops if op != PARAMETER]
    branches = [Selector(all_of=[chosen, Selector(op=module_ops)])] if chosen is not None else []
    if parameters:  # a kind that cannot adapt parameters selects none, and its checkpoint's tensors say so
        branches.append(Selector(op=PARAMETER if PARAMETER in ops else [], param=list(parameters)))
    excludes = []
    exclude = config.get("exclude_modules")
    if exclude:
        excludes.append(Selector(module=f"re:{exclude}" if isinstance(exclude, str) else list(exclude)))
    for name in config.get("modules_to_save") or ():
        excludes.append(Selector(module=rf"re:(^|.*\.){name}($|\..*)"))
    excluded = (excludes[0] if len(excludes) == 1 else Selector(any_of=excludes)) if excludes else None
    if len(branches) == 1:
        return branches[0].model_copy(update={"exclude": excluded})
    return Selector(any_of=branches, exclude=excluded)


def _exact(names: list[str]) -> str:
    return "re:" + "|".join(re.escape(n) for n in names)


def _list_target(names: list[str], layers: Any, patterns: Any, file: str) -> Selector:
    suffix = Selector(module=names)
    if layers is None or layers == []:
        return suffix
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not patterns:
        by_layer = Selector(module=r"re:.*?\.[^.]*\.(?P<layer>\d+)\..*", layers=wanted)
    else:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        regexes = [rf"re:(?:^|.*?\.){p}\.(?P<layer>\d+)\..*" for p in patterns]
        # PEFT takes the first pattern that matches and decides on its index alone
        by_layer = Selector(
            any_of=[
                Selector(
                    all_of=[
                        *(Selector(not_=Selector(module=r)) for r in regexes[:i]),
                        Selector(module=regex, layers=wanted),
                    ]
                )
                for i, regex in enumerate(regexes)
            ]
        )
    return Selector(any_of=[Selector(module=_exact(names)), Selector(all_of=[suffix, by_layer])])
