"""Packaging for guide-llm, read from settings.ini (nbdev 2 convention)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
extras = {
    # onnxruntime and onnxruntime-gpu overwrite each other: install exactly one of these extras.
    # CUDA builds of torch bring Triton; on the CPU it is installed for its interpreter, which runs the engine's kernel tests.
    "cpu": ["onnxruntime", "triton==3.9.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    "gpu": cfg.get("gpu_requirements", "").split(),
    "dev": cfg.get("dev_requirements", "").split(),
}

setuptools.setup(
    name=cfg["dist_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    keywords=cfg["keywords"],
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=["guide", "guide.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
