# Recipes for everyday work; `cargo install just` if you do not have it.

# Run the server on its embedded defaults (127.0.0.1:7700, data in ./data).
run *ARGS:
    cargo run --release -- serve {{ARGS}}

# The test suite (what CI runs after the lints).
test:
    cargo test --workspace

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# All of CI, locally.
ci:
    bash .ci/run

# The benchmark suite: the store's micro-benchmarks, then the side-by-side run.
bench: bench-store bench-compare

# Switchboard and mosquitto side by side (idle memory, max 1:1 rate, offline drain).
bench-compare *ARGS:
    bash bench/compare.sh {{ARGS}}

# The SIGKILL crash test with the full 20 rounds per durability level.
crash-full:
    SWITCHBOARD_CRASH_ROUNDS=20 cargo test --release --test store_crash -- --nocapture

# The store's micro-benchmarks (criterion).
bench-store:
    cargo bench -p switchboard-bench --bench store_log

# A two-terminal chat: `just chat alice` in one, `just chat bob` in another.
chat PROFILE="me":
    cargo run --release -- chat --profile {{PROFILE}}.cred

# The seeded simulation, long: `just sim --seeds 100000 --steps 1000 [--first S] [--jobs J]`.
sim *ARGS:
    bash tests/sim/run.sh {{ARGS}}
