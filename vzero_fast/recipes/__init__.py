"""Recipes built on the GRPO engine: each names its roles, their order per iteration, and its rewards."""


def build_recipe(name: str, trainer):
    """The one place that maps `train.recipe` to a recipe class."""
    if name == "vzero":
        from vzero_fast.recipes.vzero import VZeroRecipe

        return VZeroRecipe(trainer)
    if name == "toy":
        from vzero_fast.recipes.toy import ToyRecipe

        return ToyRecipe(trainer)
    if name == "grpo":
        from vzero_fast.recipes.grpo import GRPORecipe

        return GRPORecipe(trainer)
    if name == "selfjudge":
        from vzero_fast.recipes.selfjudge import SelfJudgeRecipe

        return SelfJudgeRecipe(trainer)
    if name == "opd":
        from vzero_fast.recipes.opd import OPDRecipe

        return OPDRecipe(trainer)
    if name == "mmzero":
        from vzero_fast.recipes.mmzero import MMZeroRecipe

        return MMZeroRecipe(trainer)
    raise ValueError(f"unknown recipe {name!r}")
