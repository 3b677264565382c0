"""`tunekit data scan|redact` and `tunekit logs purge|erase|export|stats`: thin functions over scan.py and
logstore.py."""

from __future__ import annotations

import json


def run(args) -> int:
    if args.command == "data":
        from .scan import redact_file, scan_file

        if args.data_command == "scan":
            report = scan_file(args.file)
            print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if args.json
                  else report.render(args.examples))
            return 1 if report.total else 0  # like grep: 1 = personal data found (scripts can gate on it)
        from .redactor import Redactor

        report = redact_file(args.file, args.out, Redactor(operator=args.operator))
        print(f"{args.out}: {report.records} records, {report.total} finding(s) replaced"
              + (f" ({', '.join(f'{e} {n}' for e, n in sorted(report.counts.items()))})" if report.total else ""))
        return 0
    from .logstore import LogStore

    store = LogStore(args.db)
    if args.logs_command == "purge":
        print(f"purged {store.purge(args.days)} row(s) older than {args.days:g} days")
    elif args.logs_command == "erase":
        extra = {}
        if not args.no_rag:
            from .erasure import rag_eraser

            extra["rag"] = rag_eraser(args.rag_store)  # default: $TUNEKIT_RAG_STORE, else $TUNEKIT_CACHE/rag
        counts = store.erase_user(args.user, actor="cli", extra_stores=extra)
        print(json.dumps({"erased": counts}))
    elif args.logs_command == "export":
        n = store.export_user(args.user, args.out)
        print(f"{args.out}: {n} row(s) (recorded: `tunekit logs erase --user ...` deletes this file too)")
    else:
        print(json.dumps({"rows": store.count(), "erasures": len(store.audit())}))
    return 0
