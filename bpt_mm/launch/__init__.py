"""What ``tools/train.py`` and ``tools/test.py`` share, by concern:

* :mod:`.config`: config loading with the scope check, the common flags,
  work-dir and loop checks, building the model and the runner;
* :mod:`.distributed`: distributed start-up (NCCL with one process per GPU,
  gloo on machines without a GPU) and AMP (bf16 where the GPU has it);
* :mod:`.preflight`: checks before a run (data paths, whitening source and
  output) and the switches the tools set (non-finite check, drawing);
* :mod:`.resume`: the resume marker and whether a checkpoint fits the model.

The tools stay thin scripts over these functions, as mmdet's and mmseg's do.
"""
from .config import (SCOPES, load_config, default_work_dir,
                     add_common_arguments, resolve_device, check_work_dir,
                     check_loop_settings, config_from_args,
                     seed_as_the_runner, build_prompted_model,
                     build_runner)
from .distributed import (LAUNCHERS, AMP_DTYPES, setup_launcher, native_bf16,
                          bf16_blocker, amp_dtype, enable_amp)
from .preflight import (check_whitening_output, set_finite_check,
                        enable_visualization, check_data_paths,
                        check_whitening_source)
from .resume import (latest_checkpoint, resolve_auto_resume,
                     check_resume_checkpoint, check_load_from_checkpoint,
                     check_checkpoint_covers_model)

__all__ = [
    'SCOPES',
    'LAUNCHERS',
    'load_config',
    'default_work_dir',
    'add_common_arguments',
    'resolve_device',
    'check_work_dir',
    'check_loop_settings',
    'config_from_args',
    'seed_as_the_runner',
    'build_prompted_model',
    'build_runner',
    'AMP_DTYPES',
    'setup_launcher',
    'native_bf16',
    'bf16_blocker',
    'amp_dtype',
    'enable_amp',
    'check_whitening_output',
    'set_finite_check',
    'enable_visualization',
    'check_data_paths',
    'check_whitening_source',
    'latest_checkpoint',
    'resolve_auto_resume',
    'check_resume_checkpoint',
    'check_load_from_checkpoint',
    'check_checkpoint_covers_model',
]
