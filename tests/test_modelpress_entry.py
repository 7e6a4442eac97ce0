import sys
import types

import modelpress_entry


class _Interrupted(types.ModuleType):
    def __getattr__(self, name):  # Ctrl-C while the package (torch) is being imported
        raise KeyboardInterrupt


def test_ctrl_c_while_importing_ends_quietly_with_130(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelpress.cli", _Interrupted("modelpress.cli"))
    assert modelpress_entry.main() == 130
    assert capsys.readouterr().err == "modelpress: interrupted\n"


def test_the_entry_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["modelpress", "zoo", "list", "--json"])
    assert modelpress_entry.main() == 0
    assert '"digits-cnn"' in capsys.readouterr().out
