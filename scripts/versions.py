"""Print the versions of the libraries lra-peft runs on (CI logs say which versions the tests ran with)."""

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "datasets",
            "bitsandbytes", "seqeval", "scikit-learn", "matplotlib")


def main() -> None:
    import platform

    print(f"python {platform.python_version()}")
    for name in PACKAGES:
        try:
            print(f"{name} {version(name)}")
        except PackageNotFoundError:
            print(f"{name} (not installed)")


if __name__ == "__main__":
    main()
