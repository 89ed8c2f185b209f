"""Check that the tests guard what they claim: apply each one-line mutation of ``src/`` to a
throw-away copy of this checkout, run only the tests named for it there, and report whether
they caught it (some test failed) or missed it (all passed). Run before resolving an issue,
not in CI: it takes minutes.

    .venv/bin/python tools/mutations.py                       # every mutation
    .venv/bin/python tools/mutations.py optimizer-steps ...   # some, by name
    .venv/bin/python tools/mutations.py --list

To add one, append a `Mutation` to MUTATIONS: the file, one exact line as it is now (it must
occur once), the line that replaces it, and the tests that must fail. A line that is no longer
in the file is reported as "stale" (the code moved on; update the entry), never silently skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv/bin/python"
COPIED = ("src", "tests", "examples", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    name: str
    guarantee: str
    file: str
    line: str
    replacement: str
    tests: tuple[str, ...]
    note: str = ""


MUTATIONS = [
    # -- training and strategies ---------------------------------------------------------------
    Mutation("optimizer-steps", "fit updates the weights",
             "src/distsave/training/steps.py", "            self.model.optimizer.step()", "            pass",
             ("tests/training/test_fast_path.py::test_auto_on_a_cpu_trains_eagerly",
              "tests/saving/test_model_format.py::test_save_inside_and_outside_scope",
              "tests/layers/test_saved_model_layer.py::test_frozen_layer_is_unchanged_by_fit",
              "tests/strategies/test_mirrored.py::test_two_replicas_x32_equal_one_replica_x64")),
    Mutation("capture-insists", "jit_compile=True raises when capture fails",
             "src/distsave/training/steps.py", "    if model.jit_compile is True:", "    if False:",
             ("tests/training/test_fast_path.py::test_a_failed_capture_raises_under_true_and_warns_under_auto",)),
    Mutation("replicas-average", "replicas average their gradients (DDP)",
             "src/distsave/strategies/mirrored.py",
             "            return DistributedDataParallel(module, process_group=self._group)",
             "            return module",
             ("tests/strategies/test_mirrored.py::test_two_replicas_x32_equal_one_replica_x64",)),
    Mutation("sharded-no-whole-broadcast", "compiling under ShardedStrategy never puts the whole model on a device",
             "src/distsave/strategies/sharded.py",
             "    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:",
             "    def _broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:",
             ("tests/strategies/test_sharded.py::test_sharded_x2_holds_row_shards_of_weights_and_adam_state",)),
    Mutation("replica-loss-scale", "N replicas x B/N equal one replica x B",
             "src/distsave/training/steps.py", "        self._step(x, y, rows * replicas / global_size)",
             "        self._step(x, y, rows / global_size)",
             ("tests/strategies/test_mirrored.py::test_two_replicas_x32_equal_one_replica_x64",)),
    Mutation("thread-count", "a strategy leaves the user's thread count alone",
             "src/distsave/strategies/mirrored.py",
             "        elif (threads := _cpu_threads_per_replica(self.num_replicas_in_sync)) is not None:",
             "        elif (threads := max(1, (os.cpu_count() or 1) // self.num_replicas_in_sync)):",
             ("tests/strategies/test_clean_exit.py::test_one_cpu_replica_keeps_the_users_thread_count",)),
    Mutation("clean-exit", "replicas exit cleanly after a save",
             "src/distsave/strategies/mirrored.py", "            _settle(tensors)", "            pass",
             ("tests/strategies/test_clean_exit.py::test_ten_two_replica_saves_all_exit_cleanly",),
             note="probabilistic: the abort it guards against hits ~1 run in 20 idle, ~1 in 3 busy"),
    Mutation("progress-bar-interval", "the progress bar reads metrics at most every 0.25 s",
             "src/distsave/training/callbacks.py",
             "    def __init__(self, interval: float = 0.25, live: bool | None = None):",
             "    def __init__(self, interval: float = 0, live: bool | None = None):",
             ("tests/training/test_model.py::test_progress_bar_reads_metrics_at_a_bounded_rate",)),
    Mutation("frozen-on-load", "a trainable SavedModelLayer is still trainable after loading",
             "src/distsave/layers/saved_model_layer.py", '            return cls(loaded, **config)',
             '            return cls(loaded, **{**config, "trainable": False})',
             ("tests/layers/test_saved_model_layer.py::test_model_with_the_layer_saves_and_loads_through_both_apis",)),
    Mutation("gpu-names", "'/gpu:N' names GPU N",
             "src/distsave/strategies/devices.py", '            device = torch.device("cuda", int(index or 0))',
             '            device = torch.device("cuda", 0)',
             ("tests/strategies/test_devices.py",)),
    # -- saving -------------------------------------------------------------------------------
    Mutation("chunk-checksums", "a changed byte in any tensor file is refused",
             "src/distsave/saving/tensor_io.py",
             "        passed[number] = jobs[number].chunk < len(digests) and hexdigest == digests[jobs[number].chunk]",
             "        passed[number] = True",
             ("tests/saving/test_tensor_io.py::test_a_flipped_byte_anywhere_is_found_and_named",
              "tests/saving/test_corruption.py")),
    Mutation("block-reads-short", "a GPU load's direct read that comes short is read again buffered (both readers)",
             "src/distsave/saving/direct_reads.py",
             "            self.refused = True",
             "            pass",
             ("tests/saving/test_tensor_io.py::test_block_reads_place_and_hash_a_chunk_as_the_buffered_read_does",)),
    Mutation("kernel-reads-errors", "an error while placing a kernel-read chunk reaches the caller",
             "src/distsave/saving/direct_reads.py",
             "            raise errors[0]",
             "            pass",
             ("tests/saving/test_tensor_io.py::test_block_reads_place_and_hash_a_chunk_as_the_buffered_read_does",)),
    Mutation("direct-reads-name-file", "a disk error during a GPU load names the file (both readers)",
             "src/distsave/saving/direct_reads.py",
             "            raise _failed_read(self.fd, -result)",
             "            raise OSError(-result, os.strerror(-result))",
             ("tests/saving/test_tensor_io.py::test_a_failed_direct_read_names_the_file",)),
    Mutation("block-reads-gaps", "a GPU load hashes the bytes between the pieces it places",
             "src/distsave/saving/direct_reads.py",
             "                digest.update(chunk.view[position - chunk.start:p.offset - chunk.start])",
             "                pass",
             ("tests/saving/test_tensor_io.py::test_block_reads_place_and_hash_a_chunk_as_the_buffered_read_does",)),
    Mutation("staging-huge-pages", "GPU staging buffers are advised onto transparent huge pages",
             "src/distsave/saving/pinned.py",
             "    region.madvise(mmap.MADV_HUGEPAGE)",
             "    pass",
             ("tests/saving/test_pinned.py::test_staging_memory_starts_on_a_huge_page_and_is_backed_by_them",)),
    Mutation("staging-aligned", "GPU staging buffers start on a huge-page boundary",
             "src/distsave/saving/pinned.py",
             "    buffer = whole[(-whole.data_ptr()) % HUGE_PAGE_BYTES:][:size]",
             "    buffer = whole[:size]",
             ("tests/saving/test_pinned.py::test_staging_memory_starts_on_a_huge_page_and_is_backed_by_them",)),
    Mutation("manifest-checksum", "an edited manifest is refused",
             "src/distsave/saving/snapshot.py",
             '        if manifest["manifest_sha256"] != hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest():',
             "        if False:",
             ("tests/saving/test_corruption.py::test_edited_manifest_is_detected",)),
    Mutation("manifest-schema", "manifest fields of the wrong type are refused, naming the field",
             "src/distsave/saving/format.py",
             '    version = s.count(m.get("format_version"), "format_version", positive=True)',
             '    version = m.get("format_version")',
             ("tests/security/test_manifest_and_paths.py::test_malformed_field_is_named",)),
    Mutation("program-names", "names in programs never reach generated code",
             "src/distsave/saving/program_schema.py",
             "    if not _IDENTIFIER.fullmatch(value) or keyword.iskeyword(value):",
             "    if False:",
             ("tests/saving/test_hostile_programs.py::test_load_refuses_a_crafted_name_and_names_its_field",)),
    Mutation("state-paths", "state paths in programs are dotted identifiers",
             "src/distsave/saving/program_schema.py",
             "        if not _IDENTIFIER.fullmatch(part) or keyword.iskeyword(part) or part.startswith(\"__\"):",
             "        if False:",
             ("tests/saving/test_hostile_programs.py::test_load_refuses_a_crafted_name_and_names_its_field",)),
    Mutation("no-symlinks", "files are opened without following symlinks",
             "src/distsave/saving/snapshot.py",
             "_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, \"O_CLOEXEC\", 0)",
             "_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, \"O_CLOEXEC\", 0)",
             ("tests/security/test_manifest_and_paths.py::test_special_files_are_refused_without_hanging",
              "tests/saving/test_corruption.py")),
    Mutation("check-before-allocating", "claimed shapes are compared with the files before allocation",
             "src/distsave/saving/model_format.py",
             "        _adopt_stored_dtypes(model, snapshot.tensor_files(WEIGHTS), str(snapshot.root / single_file(WEIGHTS)))",
             "        pass",
             ("tests/security/test_memory_bombs.py::test_claimed_shapes_are_refused_before_allocating",)),
    Mutation("one-snapshot", "a load racing a save reads the files it opened, never others",
             "src/distsave/saving/snapshot.py",
             "                header = self._headers[name]",
             "                header = parse_header(name, os.open(self.root / name, os.O_RDONLY), self._files[name][1])",
             ("tests/security/test_load_during_save.py",)),
    Mutation("one-snapshot-mapped", "a mapped load racing a save maps the files it opened, never others",
             "src/distsave/saving/snapshot.py",
             "        jobs = [(self._headers[name], *self._digests(name)) for stem in stems for name in names[stem]]",
             "        jobs = [(parse_header(name, os.open(self.root / name, os.O_RDONLY), self._files[name][1]), "
             "*self._digests(name)) for stem in stems for name in names[stem]]",
             ("tests/security/test_load_during_save.py",)),
    Mutation("signature-names", "signature names given to save are file names",
             "src/distsave/saving/signatures.py",
             "        resolved[check_signature_name(name)] = Signature(sig.fn, list(spec), sig.output_names or (",
             "        resolved[name] = Signature(sig.fn, list(spec), sig.output_names or (",
             ("tests/security/test_manifest_and_paths.py::test_signature_names_must_be_file_names",)),
    Mutation("async-snapshot", "an async save holds the weights of the moment it was called",
             "src/distsave/saving/model_format.py",
             "        tensor_sets, ready = stable_copies(model, tensor_sets)",
             "        ready = None",
             ("tests/saving/test_async_save.py::test_async_save_holds_the_weights_of_the_moment_it_was_called",)),
    Mutation("concurrent-savers", "a saver never removes another's staging folder",
             "src/distsave/saving/atomic.py",
             "            if _lock(fd) and _still_at(leftover, fd) and not _restore_moved_aside(leftover, target):",
             "            if not _restore_moved_aside(leftover, target):",
             ("tests/saving/test_save_faults.py",)),
    Mutation("switch-interval-restored", "saves give the process its GIL switch interval back",
             "src/distsave/saving/tensor_io.py",
             "        sys.setswitchinterval(before)",
             "        pass",
             ("tests/saving/test_tensor_io.py::test_save_and_load_give_the_interpreter_its_gil_switch_interval_back",)),
    Mutation("load-without-dynamo", "load_model rebuilds the optimizer without importing torch._dynamo",
             "src/distsave/training/optimizers.py",
             '            setattr(plain, "__dynamo_disable", plain)',
             "            pass",
             ("tests/test_import_cost.py::test_load_model_restores_the_optimizer_without_torch_dynamo_and_fit_still_works",)),
    Mutation("load-without-sympy", "load_model allocates without torch's Python empty_like (sympy)",
             "src/distsave/saving/model_format.py",
             "    model._apply(lambda t: by_identity[id(t)] if id(t) in by_identity else _empty_on(t, device))",
             "    model._apply(lambda t: by_identity[id(t)] if id(t) in by_identity else torch.empty_like(t, device=device))",
             ("tests/test_import_cost.py::test_load_model_restores_the_optimizer_without_torch_dynamo_and_fit_still_works",)),
    Mutation("cpu-blocks-hooks", "fused conv blocks leave layers with hooks alone",
             "src/distsave/training/cpu_blocks.py",
             "        return type(layer) is kind and not _has_hooks(layer)",
             "        return type(layer) is kind",
             ("tests/training/test_cpu_blocks.py::test_only_runs_nothing_could_notice_are_fused",)),
    Mutation("cpu-blocks-tracing", "a program recorded during fit records the layers as written",
             "src/distsave/training/cpu_blocks.py",
             "    if is_tracing():",
             "    if False:",
             ("tests/training/test_cpu_blocks.py",)),
    Mutation("program-blocks-indices", "a pooling whose indices are read is not fused",
             "src/distsave/saving/program_rewrites.py",
             "        elif user.users:",
             "        elif False:",
             ("tests/saving/test_program_rewrites.py",)),
    Mutation("program-blocks-tracing", "a model holding a fused program re-saves it as written",
             "src/distsave/saving/program_rewrites.py",
             "    if is_tracing():",
             "    if False:",
             ("tests/saving/test_program_rewrites.py",)),
    Mutation("dataset-one-split", "datasets.load(split=) reads only that split's files",
             "src/distsave/data/datasets.py",
             "    splits, info = loader(data_dir, tuple(known) if split is None else (split,))",
             "    splits, info = loader(data_dir, tuple(known))",
             ("tests/data/test_mnist.py::test_one_split_reads_only_its_own_files",)),
    Mutation("checksum-v4", "version 4 files are checked with XXH3-128",
             "src/distsave/saving/checksum.py",
             "    return SHA256 if version < 4 else XXH3_128",
             "    return SHA256",
             ("tests/saving/test_tensor_io.py::test_version_4_checksums_are_xxh3_128_of_each_chunk",)),
    Mutation("checksum-old-versions", "versions 1-3 still verify with sha256",
             "src/distsave/saving/checksum.py",
             "    return SHA256 if version < 4 else XXH3_128",
             "    return XXH3_128",
             ("tests/saving/test_tensor_io.py::test_older_format_versions_with_sha256_still_load_and_check_every_byte",)),
    Mutation("checksum-v1-one-digest", "a version 1 file over one chunk has one digest",
             "src/distsave/saving/format.py",
             "            chunks = 1  # one digest of the whole file",
             "            chunks = max(1, -(-size // HASH_CHUNK_BYTES))",
             ("tests/saving/test_tensor_io.py::test_older_format_versions_with_sha256_still_load_and_check_every_byte",)),
    Mutation("reserve-blocks", "a file's blocks are reserved before its writers start",
             "src/distsave/saving/tensor_io.py",
             "    if size and _fallocate is not None and _fallocate(fd, 0, 0, size) != 0:",
             "    if False:",
             ("tests/saving/test_tensor_io.py::test_files_get_their_blocks_before_the_writers_start",)),
    Mutation("export-in-helper", "a first background save does not export on the caller's thread",
             "src/distsave/saving/model_format.py",
             "    if modules is not None:",
             "    if False:",
             ("tests/saving/test_async_save.py::test_a_first_background_save_leaves_the_export_to_a_helper_process",)),
    Mutation("fork-export-in-helper", "a forking controller's save never exports in the controller",
             "src/distsave/saving/model_format.py",
             '    if strategy.is_chief and (not blocking or strategy.forks):',
             "    if strategy.is_chief and not blocking:",
             ("tests/strategies/test_forked.py::test_a_forking_controller_saves_without_exporting_itself_and_forks_again",)),
    Mutation("helper-plain-tensors", "a model with plain tensor attributes exports from itself",
             "src/distsave/saving/model_format.py",
             "    on_meta = not any(isinstance(value, torch.Tensor) for module in rebuilt.modules()",
             "    on_meta = True or any(isinstance(value, torch.Tensor) for module in rebuilt.modules()",
             ("tests/saving/test_async_save.py::test_a_model_a_helper_cannot_rebuild_is_exported_before_the_save_returns",)),
    Mutation("helper-reply-checked", "a helper's program is checked like one read from a file",
             "src/distsave/saving/export_process.py",
             "        if problems:",
             "        if False:",
             ("tests/saving/test_async_save.py::test_what_a_helper_sends_back_is_checked_like_a_file",)),
    Mutation("helper-reply-file-name", "a helper's reply names only the signature's own file",
             "src/distsave/saving/export_process.py",
             '        if not isinstance(entry, dict) or entry.get("program") != signature_file(check_signature_name(name)):',
             "        if not isinstance(entry, dict):",
             ("tests/saving/test_async_save.py::test_what_a_helper_sends_back_is_checked_like_a_file",)),
    Mutation("cache-entry-checked", "a cached program is checked like one read from a file",
             "src/distsave/saving/export_process.py",
             "        if problems:",
             "        if False:",
             ("tests/saving/test_program_cache.py::test_a_bad_entry_is_not_served_and_is_replaced",)),
    Mutation("cache-built-in-only", "a model with a class of the user's is never served from the cache",
             "src/distsave/saving/program_cache.py",
             "    if helper_modules(architecture) != []:",
             "    if False:",
             ("tests/saving/test_program_cache.py::test_a_model_with_a_class_of_the_users_is_never_cached",)),
    Mutation("cache-key-versions", "the cache key holds torch's version and the default dtype",
             "src/distsave/saving/program_cache.py",
             '                "default_dtype": str(torch.get_default_dtype()), "torch": torch.__version__,',
             '                "default_dtype": "", "torch": "",',
             ("tests/saving/test_program_cache.py::test_the_key_changes_with_everything_the_program_depends_on",)),
    Mutation("cache-key-code", "the cache key holds distsave's own code",
             "src/distsave/saving/program_cache.py",
             '                "torch_git": getattr(torch.version, "git_version", None), "distsave_code": code}',
             '                "torch_git": getattr(torch.version, "git_version", None)}',
             ("tests/saving/test_program_cache.py::test_the_key_changes_with_everything_the_program_depends_on",)),
    Mutation("cache-private", "a cache folder others may write to is not used",
             "src/distsave/saving/program_cache.py",
             "    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, \"getuid\") and info.st_uid != os.getuid()):",
             "    if False:",
             ("tests/saving/test_program_cache.py::test_the_cache_can_be_turned_off_and_is_private_to_its_user",)),
    Mutation("mapped-chunks-checked", "a mapped load checks every chunk before handing out tensors",
             "src/distsave/saving/mapped.py",
             "        return chunk < len(digests) and digest.hexdigest() == digests[chunk]",
             "        return True",
             ("tests/saving/test_tensor_io.py::test_a_flipped_byte_anywhere_is_found_and_named",)),
    Mutation("mapped-header-as-parsed", "a mapped load checks the header as it was parsed",
             "src/distsave/saving/mapped.py",
             "            digest.update(file.header[start:min(end, header)])",
             "            digest.update(memoryview(maps[index])[start:min(end, header)])",
             ("tests/saving/test_mapped_load.py::test_the_header_is_checked_as_it_was_parsed_not_as_the_file_holds_it_later",)),
    Mutation("mapped-unaligned-copied", "tensors not on a 64-byte boundary are copied to aligned memory",
             "src/distsave/saving/mapped.py",
             "        if entry.start % TENSOR_ALIGNMENT:",
             "        if False:",
             ("tests/saving/test_mapped_load.py::test_a_cpu_load_maps_aligned_tensors_and_copies_the_rest_to_aligned_memory",
              "tests/saving/test_mapped_load.py::test_a_file_of_another_writer_loads_with_every_tensor_aligned")),
    Mutation("mapped-cut-short", "a file cut short before it is mapped is refused by name",
             "src/distsave/saving/mapped.py",
             "    except (OSError, ValueError) as error:  # ValueError: the file is shorter than when opened",
             "    except OSError as error:",
             ("tests/saving/test_mapped_load.py::test_a_file_cut_short_after_it_was_opened_is_refused_by_name",)),
    Mutation("layout-aligned", "written files start 64-byte multiples on 64-byte boundaries",
             "src/distsave/saving/tensor_io.py",
             "    text += b\" \" * (-(len(text) + 8) % TENSOR_ALIGNMENT)",
             "    text += b\" \" * (-(len(text) + 8) % 8)",
             ("tests/saving/test_mapped_load.py::test_written_files_start_tensors_of_64_byte_multiples_on_64_byte_boundaries",
              "tests/saving/test_mapped_load.py::test_a_cpu_load_maps_aligned_tensors_and_copies_the_rest_to_aligned_memory")),
    Mutation("program-device-from-input", "a program makes its tensors on its input's device, not the export's",
             "src/distsave/saving/program_graph.py", "        if self.first_input is None:",
             "        if True:",
             ("tests/saving/test_saved_model.py::test_a_program_makes_its_tensors_where_its_inputs_are",
              "tests/saving/test_layer_round_trips.py::test_family_round_trips_through_load_model")),
    Mutation("recurrent-arguments", "RNN/LSTM/GRU record their constructor arguments",
             "src/distsave/saving/architecture.py", "    if cls in (nn.RNN, nn.LSTM, nn.GRU):", "    if False:",
             ("tests/saving/test_layer_round_trips.py::test_family_round_trips_through_load_model",)),
    Mutation("undecomposed-ops-allowed", "programs may call adaptive max pooling",
             "src/distsave/saving/program_schema.py",
             '_UNDECOMPOSED_OPS = frozenset({"adaptive_max_pool2d.default", "adaptive_max_pool3d.default"})',
             "_UNDECOMPOSED_OPS = frozenset()",
             ("tests/saving/test_layer_round_trips.py::test_family_round_trips_through_load_model",)),
]


def _copy_checkout(into: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, into / name)


def _apply(mutation: Mutation, copy: Path) -> bool:
    """Replace the line in the copy; False when the line is not there exactly once (stale)."""
    path = copy / mutation.file
    lines = path.read_text().split("\n")
    hits = [i for i, line in enumerate(lines) if line == mutation.line]
    if len(hits) != 1:
        return False
    lines[hits[0]] = mutation.replacement
    path.write_text("\n".join(lines))
    return True


def run(mutation: Mutation, timeout: float) -> tuple[str, list[str], float]:
    """Outcome ("caught", "MISSED", "stale", "error", "timeout"), the failing tests, seconds."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distsave-mutant-") as folder:
        copy = Path(folder)
        _copy_checkout(copy)
        if not _apply(mutation, copy):
            return "stale", [], 0.0
        env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
        where = subprocess.run([str(PYTHON), "-c", "import distsave; print(distsave.__file__)"],
                               capture_output=True, text=True, cwd=copy, env=env).stdout
        if not where.startswith(str(copy)):
            raise RuntimeError(f"The mutant copy is not the one imported ({where.strip()}); "
                               "check that PYTHONPATH reaches the venv.")
        command = [str(PYTHON), "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:randomly",
                   *mutation.tests]
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd=copy, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", [], time.monotonic() - start
    failed = re.findall(r"^FAILED (\S+)", result.stdout, flags=re.MULTILINE)
    outcome = {0: "MISSED", 1: "caught"}.get(result.returncode, "error")
    if outcome == "error":
        failed = [result.stdout[-800:]]
    return outcome, failed, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutation")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; see --list")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:<24} {m.guarantee}  [{m.file}]")
        return 0
    print("| mutation | guarantee | outcome | tests that caught it | seconds |")
    print("|---|---|---|---|---:|")
    bad = 0
    for m in chosen:
        outcome, failed, seconds = run(m, args.timeout)
        bad += outcome != "caught"
        shown = ", ".join(f.split("::")[-1] if "::" in f else f for f in failed) if outcome == "caught" else \
            " ".join(failed)[:300].replace("\n", " ")
        note = f" ({m.note})" if m.note else ""
        print(f"| {m.name} | {m.guarantee}{note} | {outcome} | {shown} | {seconds:.0f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
