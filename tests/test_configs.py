"""configs/: the variant parser and the shared section builders (every field of a section exists wherever the
section is used, so the command line can override it)."""

import pytest

from configs import common, dpo, generate, rewardbench, rewardbench_self_reward, self_improve


def test_parse_arg_flags_typed_values_and_errors():
  v = common.parse_arg("paper,demo,size=7,rate=0.5,on=false", valid=("paper", "demo", "chat"), size=1, rate=0.1,
                       on=True)
  assert (v.paper, v.demo, v.chat, v.size, v.rate, v.on) == (True, True, False, 7, 0.5, False)
  assert common.parse_arg("x=3.5,name=abc", lazy=True).to_dict() == {"x": 3.5, "name": "abc"}
  with pytest.raises(ValueError, match=r"unknown variant 'papr'; choose from \('paper',\)"):
    common.parse_arg("papr", valid=("paper",))
  with pytest.raises(ValueError, match="unknown config argument 'size'"):
    common.parse_arg("size=3", valid=("paper",))


def test_sections_are_the_same_everywhere():
  scoring = common.scoring().to_dict()
  assert rewardbench.get_config().scoring.to_dict() == scoring
  assert {**self_improve.get_config().scoring.to_dict(), "progress": True} == scoring  # packing, shared_prefix, ...
  assert set(self_improve.get_config().self_reward) - {"sampling"} == set(common.judge())
  assert set(rewardbench_self_reward.get_config().judge) == set(common.judge())
  training = common.training()
  assert {k: set(dpo.get_config()[k]) for k in training} == {k: set(v) for k, v in training.items()}
  assert {k: set(self_improve.get_config().training[k]) for k in training} == {k: set(v) for k, v in training.items()}
  assert set(generate.get_config().sampling) == set(self_improve.get_config().sampling) == set(common.sampling())
  for module in (dpo, generate, rewardbench, rewardbench_self_reward, self_improve):
    assert module.get_config().overwrite is False and module.get_config().output_dir


def test_self_improve_variants_pick_one_size_and_one_arm():
  assert self_improve.get_config("local,random").label.arm == "random"
  with pytest.raises(ValueError, match="several arms"):
    self_improve.get_config("ipo,random")
  with pytest.raises(ValueError, match="one size"):
    self_improve.get_config("local,paper")


def test_every_config_file_and_variant_builds_a_known_task_with_an_output_dir():
  import glob  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from ipo_jax import main  # pylint: disable=import-outside-toplevel
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(os.path.dirname(common.__file__), "*.py")))
  tasks = set()
  for name in (n for n in names if n not in ("__init__", "common")):
    module = importlib.import_module(f"configs.{name}")
    for variant in (None, *getattr(module, "VARIANTS", ())):
      config = module.get_config(variant)
      assert config.task in main.TASKS, (name, variant, config.task)
      assert config.overwrite is False and (config.get("output_dir") or config.task == "model_info"), (name, variant)
      tasks.add(config.task)
  assert set(main.TASKS) == tasks  # every task has a config file
