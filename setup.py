"""Packaging for bpt_mm. The version lives in bpt_mm/version.py only."""
import os.path as osp
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    with open(osp.join(HERE, 'bpt_mm', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


def read_requirements(name: str) -> list:
    """Requirement lines of requirements/<name>, without comments and
    blanks."""
    with open(osp.join(HERE, 'requirements', name)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


#: Folders of the source tree shipped inside the built package as
#: bpt_mm/.mim/<name>, the OpenMMLab convention (mmdet ships its configs and
#: tools the same way), so an installed bpt_mm has every config, _base_
#: files included, and the tools. bpt_mm.config_path() finds them.
MIM_FOLDERS = ('configs', 'tools')


class BuildWithMimFolders(build_py):
    """build_py that copies :data:`MIM_FOLDERS` into the build directory.

    They are copied into the build tree, never into the source tree: an
    editable install and a checkout read configs/ and tools/ in place.
    """

    def run(self) -> None:
        super().run()
        for name in MIM_FOLDERS:
            target = osp.join(self.build_lib, 'bpt_mm', '.mim', name)
            if osp.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(osp.join(HERE, name), target,
                            ignore=shutil.ignore_patterns('__pycache__',
                                                          '*.pyc'))


setup(
    name='bpt_mm',
    version=read_version(),
    description='Burstiness-aware Prompt Tuning (BPT) for dense prediction '
    'with mmdetection and mmsegmentation',
    # No license or home page is set: the repository has neither a LICENSE
    # file nor a public address yet; the owners choose them.
    project_urls={'Paper': 'https://arxiv.org/abs/2506.22908'},
    keywords='prompt tuning, vision transformer, detection, segmentation, '
    'mmdetection, mmsegmentation',
    classifiers=[
        'Development Status :: 3 - Alpha',
        'Intended Audience :: Science/Research',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Scientific/Engineering :: Image Recognition',
    ],
    long_description=open(osp.join(HERE, 'README.md')).read()
    if osp.exists(osp.join(HERE, 'README.md')) else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['bpt_mm', 'bpt_mm.*']),
    # configs/ and tools/ are added to the built package by
    # BuildWithMimFolders (bpt_mm/.mim/...).
    cmdclass={'build_py': BuildWithMimFolders},
    install_requires=read_requirements('runtime.txt') +
    read_requirements('mminstall.txt'),
    extras_require={'tests': read_requirements('tests.txt')},
    zip_safe=False,
)
