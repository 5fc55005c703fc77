"""Packaging for amt_lib (nbdev 2 layout). No pkg_resources: current setuptools no longer ships it."""
from configparser import ConfigParser
from pathlib import Path
import setuptools
from packaging.version import Version

here = Path(__file__).parent
config = ConfigParser(delimiters=['='])
config.read(here/'settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

expected = 'version description keywords author author_email license user lib_name min_python'.split()
missing = [o for o in expected if o not in cfg]
if missing: raise SystemExit(f'settings.ini is missing {missing}')
Version(cfg['version'])  # fail early on a malformed version string

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
lic = licenses[cfg['license']]
requirements = cfg.get('requirements', '').split()
dev_requirements = cfg.get('dev_requirements', '').split()
min_python = cfg['min_python']

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    license=lic[0],
    classifiers=['Development Status :: 3 - Alpha', 'Intended Audience :: Science/Research',
                 'Natural Language :: English', f'License :: {lic[1]}',
                 f'Programming Language :: Python :: {min_python}'],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['amt_lib', 'amt_lib.*']),
    include_package_data=True,
    package_data={'amt_lib': ['presets/*.yaml']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    python_requires=f'>={min_python}',
    long_description=(here/'README.md').read_text(encoding='utf-8') if (here/'README.md').exists() else '',
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
