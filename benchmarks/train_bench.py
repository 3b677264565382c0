"""Training speed benchmark against the transformers Trainer recipe and TRL (same as `tunekit bench train`)."""

from tunekit.bench.train_bench import main

if __name__ == "__main__":
    main()
