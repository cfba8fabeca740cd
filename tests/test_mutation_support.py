"""`make mutation`'s own helpers: the import alias that lets mutmut switch mutants on, and the
summary's mapping from mutant names to files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.mutation_summary import module_of, parse, table

ROOT = Path(__file__).resolve().parent.parent


def test_the_alias_makes_each_module_one_object_under_the_name_mutmut_gives_it():
    """mutmut's trampolines compare a mutant's name (from the file path) with the running
    module's ``__name__``: without the alias the code runs as catcascade.serving... and no
    mutant is ever switched on."""
    probe = (
        "import tests.mutation_aliases, sys\n"
        "import catcascade.serving.front_door.chain as chain\n"
        "from catcascade.serving.traffic.admission import AdmissionRefused\n"
        "import serving.traffic.admission as admission\n"
        "print(chain.__name__, chain.FrontDoor.classify.__module__, admission.AdmissionRefused is AdmissionRefused,\n"
        "      sys.modules['catcascade.serving'] is sys.modules['serving'])\n"
        "import catcascade.errors as errors\n"
        "print(errors.__name__)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["serving.front_door.chain", "serving.front_door.chain", "True", "True", "catcascade.errors"]


def test_mutant_names_map_to_their_files_and_the_table_counts_by_status():
    assert module_of("serving.front_door.chain.xǁFrontDoorǁclassify__mutmut_3") == "serving/front_door/chain.py"
    assert module_of("serving.model_repository.traffic_split.x_in_share__mutmut_1") == (
        "serving/model_repository/traffic_split.py")
    statuses = parse("    serving.traffic.admission.x_a__mutmut_1: killed\n"
                     "    serving.traffic.admission.x_a__mutmut_2: survived\n"
                     "    serving.traffic.admission.xǁCǁb__mutmut_1: timeout\n"
                     "    cnn_stage.topk.x_top_k__mutmut_1: not checked\n")
    text, survivors = table(statuses)
    assert "| serving/traffic/admission.py | 3 | 2 | 1 | 0 | 0 | 66.7% |" in text
    assert "| cnn_stage/topk.py | 1 | 0 | 0 | 0 | 1 | n/a |" in text
    assert survivors == ["serving.traffic.admission.x_a__mutmut_2"]
