"""The kernel matrix's report fails a row on a skipped or ignored test that is not on the written
skip list (MAY_SKIP in scripts/kernel-matrix.sh), and passes it when the list has it.

    python3 -m unittest discover -s scripts/tests
"""
import os
import subprocess
import sys
import tempfile
import unittest

REPORT = os.path.join(os.path.dirname(__file__), "..", "kernel_matrix_report.py")

CONSOLE = """=== fathom-matrix kernel 6.12.117+deb13-amd64
=== fathom-matrix begin kernel_functions
running 3 tests
test kprobe_counts ... ok
test fentry_counts ... 
fathom-skip: fentry_counts: trampolines are off here
ok
test lsm_counts ... ignored
=== fathom-matrix end kernel_functions rc=0 seconds=3
=== fathom-matrix done
"""


PANIC = """[    1.234567] Kernel panic - not syncing: VFS: Unable to mount root fs
"""


def run(may_skip, console=CONSOLE, first_boot=None):
    with tempfile.TemporaryDirectory() as out:
        row = os.path.join(out, "debian-6.12")
        os.makedirs(os.path.join(row, "lists"))
        with open(os.path.join(row, "console.log"), "w") as f:
            f.write(console)
        if first_boot is not None:
            with open(os.path.join(row, "console.first-boot.log"), "w") as f:
                f.write(first_boot)
        for name, text in [("qemu.rc", "0"), ("seconds", "3")]:
            with open(os.path.join(row, name), "w") as f:
                f.write(text)
        with open(os.path.join(row, "lists", "kernel_functions"), "w") as f:
            f.write("kprobe_counts\nfentry_counts\nlsm_counts\n")
        open(os.path.join(out, "vm-skip.tsv"), "w").close()
        with open(os.path.join(out, "may-skip.tsv"), "w") as f:
            for entry in may_skip:
                f.write("\t".join(entry) + "\n")
        p = subprocess.run(
            [sys.executable, REPORT, out, "debian-6.12=vm"], capture_output=True, text=True
        )
        return p.returncode, p.stdout


class SkipList(unittest.TestCase):
    def test_an_unlisted_skip_and_an_unlisted_ignored_test_fail_the_row(self):
        rc, text = run([])
        self.assertEqual(rc, 1, text)
        self.assertIn("debian-6.12: FAILED", text)
        self.assertIn("kernel_functions::fentry_counts was skipped (trampolines are off here)", text)
        self.assertIn("kernel_functions::lsm_counts was skipped (ignored)", text)

    def test_one_listed_skip_is_not_enough_when_another_is_unlisted(self):
        rc, text = run([("debian-*", "kernel_functions::fentry_counts", "no trampolines")])
        self.assertEqual(rc, 1, text)
        self.assertNotIn("fentry_counts was skipped", text)
        self.assertIn("lsm_counts was skipped", text)

    def test_listed_skips_pass_with_their_reasons(self):
        rc, text = run(
            [
                ("debian-*", "kernel_functions::fentry_counts", "no trampolines"),
                ("debian-6.12", "kernel_functions::lsm_counts", "LSM off"),
            ]
        )
        self.assertEqual(rc, 0, text)
        self.assertIn("debian-6.12: ok", text)
        self.assertIn("(listed: no trampolines)", text)

    def test_a_listing_for_another_row_does_not_count(self):
        rc, text = run(
            [
                ("host", "kernel_functions::fentry_counts", "no trampolines"),
                ("host", "kernel_functions::lsm_counts", "LSM off"),
            ]
        )
        self.assertEqual(rc, 1, text)


LISTED = [
    ("debian-*", "kernel_functions::fentry_counts", "no trampolines"),
    ("debian-*", "kernel_functions::lsm_counts", "LSM off"),
]


class Crashes(unittest.TestCase):
    def test_a_panic_fails_the_row_and_is_quoted(self):
        rc, text = run(LISTED, console=PANIC)
        self.assertEqual(rc, 1, text)
        self.assertIn("problem: kernel panic/BUG/Oops in the console log: [    1.234567] Kernel panic - not syncing: VFS", text)
        self.assertIn("problem: the run did not reach its end", text)

    def test_a_crash_while_booting_then_a_full_run_passes_and_names_the_first_crash(self):
        rc, text = run(LISTED, first_boot=PANIC)
        self.assertEqual(rc, 0, text)
        self.assertIn("note: booted twice: the first boot crashed (while booting, or an int3 of text patching; [    1.234567] Kernel panic", text)


if __name__ == "__main__":
    unittest.main()
