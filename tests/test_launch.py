"""The launch scripts (launch/), run against stub gcloud / srun / scontrol / var-jax
programs that record their arguments: the exact `var-jax train` command line each
script builds (quoting included), the exit status it passes on, the SLURM requeue on a
preemption exit (75), and the TPU script refusing a gs:// WORKDIR before it creates
anything."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from conftest import ROOT

LAUNCH = ROOT / 'launch'
PREEMPTED = 75

# Each call of a stub writes its name and arguments, NUL-separated, to a file of its own
# in $STUB_LOG (numbered in call order); a stub var-jax also writes the env it saw.
_RECORD = '''#!/usr/bin/env bash
n=$(ls "$STUB_LOG" | wc -l)
f="$STUB_LOG/$(printf %03d "$n")-$(basename "$0")"
printf '%s\\0' "$@" > "$f"
'''
_STUBS = {
    'var-jax': _RECORD + 'env > "$f.env"\nexit "${STUB_RC:-0}"\n',
    'nvidia-smi': _RECORD,
    # a long host list (more than a pipe holds): a reader that stops after the first
    # line makes scontrol die of SIGPIPE, which pipefail turns into the script's failure
    'scontrol': _RECORD + '[ "$1" = show ] && printf "node%s\\n" $(seq 7 30000)\nexit 0\n',
    # srun: drop its own flags, run the task once as SLURM_PROCID=0
    'srun': _RECORD + 'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 exec "$@"\n',
    # gcloud: `describe` answers $STUB_DESCRIBE_RC; the ssh that trains runs its --command
    # in bash with HOME=$STUB_HOME (where ~/var-jax/.venv/bin/var-jax is the stub)
    'gcloud': _RECORD + '''[[ " $* " == *" describe "* ]] && exit "${STUB_DESCRIBE_RC:-0}"
for a in "$@"; do
  if [[ $a == --command=*var-jax\\ train* ]]; then HOME=$STUB_HOME exec bash -c "${a#--command=}"; fi
done
exit 0
''',
}


def _stub(path: pathlib.Path, name: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(_STUBS[name])
  path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
  """(env for the scripts, a function returning the recorded calls [(name, args)])."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'log'
  log.mkdir()
  for name in ('nvidia-smi', 'scontrol', 'srun', 'gcloud'):
    _stub(bin_dir / name, name)
  venv = tmp_path / 'venv'
  _stub(venv / 'bin' / 'var-jax', 'var-jax')
  home = tmp_path / 'home'
  _stub(home / 'var-jax' / '.venv' / 'bin' / 'var-jax', 'var-jax')
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'STUB_LOG': str(log), 'VENV': str(venv),
         'STUB_HOME': str(home), 'TMPDIR': str(tmp_path), 'HOME': str(tmp_path)}

  def calls():
    return [(f.name.split('-', 1)[1], f.read_text().split('\0')[:-1])
            for f in sorted(log.iterdir()) if f.suffix != '.env']

  def seen_env():
    (f,) = log.glob('*.env')
    return dict(line.split('=', 1) for line in f.read_text().splitlines() if '=' in line)

  calls.env = seen_env
  return env, calls


def _run(script, args, env, extra):
  e = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'JAX_', 'STUB_'))}
  e.update(env, **extra)
  return subprocess.run(['bash', str(LAUNCH / script), *args], env=e, capture_output=True,
                        text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize('script', sorted(p.name for p in LAUNCH.iterdir()))
def test_launch_scripts_parse(script):
  r = subprocess.run(['bash', '-n', str(LAUNCH / script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('rc', [0, PREEMPTED, 3])
def test_gpu_single_host_runs_the_train_command_and_passes_its_status(stubs, rc):
  env, calls = stubs
  r = _run('gpu_single_host.sh', ['configs/var_d16.py', '--config.batch_size=256'], env,
           dict(WORKDIR='/ckpt/my run', DATA='/data/image net', STUB_RC=str(rc)))
  assert r.returncode == rc, r.stderr
  (vj,) = [args for name, args in calls() if name == 'var-jax']
  assert vj == ['train', '--config', 'configs/var_d16.py', '--workdir', '/ckpt/my run',
                '--distributed=off', '--config.data.path=/data/image net',
                '--config.batch_size=256']
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in calls.env()['XLA_FLAGS']


def test_gpu_single_host_needs_a_workdir(stubs):
  env, calls = stubs
  r = _run('gpu_single_host.sh', ['configs/var_d16.py'], env, {})
  assert r.returncode != 0 and 'WORKDIR' in r.stderr
  assert calls() == []


def _requeues(calls):
  return [args for name, args in calls() if name == 'scontrol' and args[0] == 'requeue']


def _slurm(env, rc, *args):
  return _run('slurm_multinode.sbatch', ['configs/var_d30.py', *args], env, dict(
      WORKDIR='/shared/ck pt', DATA='/shared/in', STUB_RC=str(rc), SLURM_JOB_NODELIST='node[7-8]',
      SLURM_NNODES='2', SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=str(ROOT)))


def test_slurm_builds_the_distributed_command(stubs):
  env, calls = stubs
  r = _slurm(env, 0, '--config.mesh.fsdp=8', "--config.run.note=it's")
  assert r.returncode == 0, r.stderr
  (vj,) = [args for name, args in calls() if name == 'var-jax']
  assert vj == ['train', '--config', 'configs/var_d30.py', '--workdir', '/shared/ck pt',
                '--distributed=on', '--config.data.path=/shared/in', '--config.mesh.fsdp=8',
                "--config.run.note=it's"]
  seen = calls.env()
  assert (seen['JAX_PROCESS_ID'], seen['JAX_NUM_PROCESSES']) == ('0', '2')
  assert seen['JAX_COORDINATOR_ADDRESS'] == 'node7:12355'
  assert not _requeues(calls)


def test_slurm_requeues_a_preempted_run_only(stubs):
  env, calls = stubs
  r = _slurm(env, PREEMPTED)
  assert r.returncode == 0, r.stderr
  assert _requeues(calls) == [['requeue', '4242']]


def test_slurm_passes_a_failure_on_without_requeue(stubs):
  env, calls = stubs
  r = _slurm(env, 3)
  assert r.returncode == 3
  assert not _requeues(calls)


def _tpu(env, rc=0, **paths):
  """tpu_pod.sh for a TPU that does not exist yet; `paths` override WORKDIR and DATA."""
  return _run('tpu_pod.sh', ['configs/var_d16.py', '--config.batch_size=1024'], env, dict(
      {'WORKDIR': '/mnt/shared/my run', 'DATA': '/mnt/image net', **paths}, TPU_NAME='var-test',
      ZONE='us-central2-b', ACCELERATOR='v4-64', STUB_RC=str(rc), STUB_DESCRIBE_RC='1'))


@pytest.mark.parametrize('var, value', [('WORKDIR', 'gs://bucket/var_d16'),
                                        ('DATA', 's3://bucket/imagenet')])
def test_tpu_pod_refuses_urls_before_creating_anything(stubs, var, value):
  env, calls = stubs
  r = _tpu(env, **{var: value})
  assert r.returncode == 2
  assert len(r.stderr.strip().splitlines()) == 1 and value in r.stderr
  assert calls() == []


@pytest.mark.parametrize('rc', [0, PREEMPTED])
def test_tpu_pod_creates_copies_installs_and_trains(stubs, rc, tmp_path):
  env, calls = stubs
  r = _tpu(env, rc)
  assert r.returncode == rc, r.stderr
  got = calls()
  gcloud = [args for name, args in got if name == 'gcloud']
  verbs = [a[3] for a in gcloud]           # gcloud compute tpus tpu-vm VERB ...
  assert verbs == ['describe', 'create', 'scp', 'ssh', 'ssh']
  assert '--accelerator-type=v4-64' in gcloud[1] and '--worker=all' in gcloud[2]
  (vj,) = [args for name, args in got if name == 'var-jax']   # run by the training ssh
  assert vj == ['train', '--config', 'configs/var_d16.py', '--workdir', '/mnt/shared/my run',
                '--distributed=on', '--config.data.path=/mnt/image net',
                '--config.batch_size=1024']
  assert not list(tmp_path.glob('var-jax.*.tgz'))   # the code tarball is removed
