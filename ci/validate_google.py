"""Validates FHIR R4 resources (one JSON per line) with google-fhir-r4.

Each line is parsed into the R4 protocol buffers with validation on
(`json_format.json_fhir_string_to_proto(line, ContainedResource, validate=True)`): unknown
elements, codes outside required bindings, malformed primitives (dates, ids, ...), missing
required elements and wrong cardinalities are errors.

Prints `INVALID line N Type/id: reason` for each invalid resource, then a summary line.
Exit status: 0 all valid, 1 some invalid, 2 usage or no resources.
"""

import json
import sys

from google.fhir.r4 import json_format
from google.fhir.r4.proto.core.resources import bundle_and_contained_resource_pb2

NAME = "google-fhir-r4"


def label(text):
    try:
        resource = json.loads(text)
    except ValueError:
        return "(not JSON)"
    if not isinstance(resource, dict):
        return "(not an object)"
    return "%s/%s" % (resource.get("resourceType", "?"), resource.get("id", "?"))


def main(argv):
    if len(argv) != 2:
        print("usage: validate_google.py FILE.ndjson", file=sys.stderr)
        return 2
    total = invalid = 0
    with open(argv[1], encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            total += 1
            try:
                json_format.json_fhir_string_to_proto(
                    line, bundle_and_contained_resource_pb2.ContainedResource, validate=True)
            except Exception as error:  # the library raises several types; all mean invalid
                invalid += 1
                reason = " ".join(str(error).split())[:400] or type(error).__name__
                print("INVALID line %d %s: %s: %s" % (number, label(line), type(error).__name__, reason))
    print("%s: %d resources, %d valid, %d invalid" % (NAME, total, total - invalid, invalid))
    if total == 0:
        print("%s: no resources to validate in %s" % (NAME, argv[1]), file=sys.stderr)
        return 2
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
