"""Write your own two-hop items, validate them, and see how patchlab reports a bad one.

python examples/custom_prompt_set.py [OUT.jsonl]
"""

import sys
from pathlib import Path

from patchlab.core.errors import PatchlabError
from patchlab.core.prompts import PromptSet, TwoHopItem

items = [
    TwoHopItem(
        id="my-0001",
        kind="landmark>country>capital",
        subject="Colosseum",
        bridge="Italy",
        answer="Rome",
        hop1="The Colosseum is located in the country of",
        hop2="The capital of Italy is",
        composed="The capital of the country where the Colosseum is located is",
        paraphrases=("The Colosseum stands in a country whose capital is",),
    ),
    TwoHopItem(
        id="my-0002",
        kind="person>country>capital",
        subject="Frida Kahlo",
        bridge="Mexico",
        answer="Mexico City",
        hop1="Frida Kahlo was a citizen of the country of",
        hop2="The capital of Mexico is",
        composed="The capital of the country Frida Kahlo was a citizen of is",
    ),
]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "my_twohop.jsonl")
PromptSet(items, source=str(out)).save(out)  # one JSON object per line, written atomically
loaded = PromptSet.load(out)  # validated: required fields, types, unique ids
assert [it.id for it in loaded] == ["my-0001", "my-0002"]
print(f"{out}: {len(loaded)} valid items, kinds {loaded.kinds}")

# A record with a missing field fails with the file, the line and the field — one line, nothing else.
bad = out.with_name("bad_" + out.name)
bad.write_text(
    out.read_text(encoding="utf-8").splitlines()[0].replace('"composed"', '"composd"') + "\n", encoding="utf-8"
)
try:
    PromptSet.load(bad)
except PatchlabError as exc:
    print("as expected:", exc)
else:
    raise SystemExit("a broken record was accepted")
