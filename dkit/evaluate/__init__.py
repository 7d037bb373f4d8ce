"""How private is a key? Real attacks at three threat levels, one module per attack.

- level 1: the cloud has the disguised data, the trained model and public knowledge;
- level 2: it also knows m plain/disguised pairs;
- level 3: it also knows the data distribution (plain images of the same kind, unpaired).

Every attack is a function of public arrays and the key's public parameters; it never sees key
material (``runner.evaluate`` makes the arrays with the key, on the owner's side). Every figure is
measured on held-out images.

    from dkit.evaluate import evaluate
    ev = evaluate("cifar.h5", Keystore().load("cifar"), open_source("./images"), model_dir="model/")
    ev.to_dict()["attacks"]
"""

from .common import LEVELS, AttackResult
from .runner import ATTACKS, Evaluation, Settings, applicable, evaluate

__all__ = ["ATTACKS", "LEVELS", "AttackResult", "Evaluation", "Settings", "applicable", "evaluate"]
