#!/usr/bin/env python3
"""Build-time helper: man pages and shell completions from innernet.py's parser.

    python3 debian/gen-docs.py OUTDIR

Generated from the argparse tree itself, so they always match the options.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import innernet  # noqa: E402

DESCRIPTION = {
    False: ("innernet", "WireGuard mesh-network client and admin tool",
            "innernet joins a network with an invitation, keeps the WireGuard interface in "
            "sync with the network's server, and lets admin peers manage the network over "
            "the API. Global options come before the command."),
    True: ("innernet-server", "innernet coordination server",
           "innernet-server creates and serves an innernet network: it keeps the CIDR "
           "tree, peers and associations in SQLite and serves them over HTTP inside the "
           "WireGuard tunnel. Global options come before the command."),
}


def roff(text):
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def options(parser, skip=frozenset()):
    """The parser's options as .TP paragraphs, but those named only by ``skip``
    (the global options, which every command also takes: listed once)."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings and set(a.option_strings) <= skip:
            continue
        if a.option_strings:
            names = ", ".join(f"\\fB{roff(o)}\\fR" for o in a.option_strings)
            if a.nargs != 0 and a.metavar is not None or (a.nargs != 0 and a.type is not None
                                                          or a.choices):
                names += f" \\fI{roff(str(a.metavar or '|'.join(a.choices or ['VALUE'])))}\\fR"
            elif a.nargs != 0 and not isinstance(a, (argparse._StoreTrueAction,
                                                     argparse._CountAction,
                                                     argparse._HelpAction,
                                                     argparse._VersionAction)):
                names += f" \\fI{roff(a.dest.upper())}\\fR"
        else:
            names = f"\\fI{roff(a.metavar or a.dest.upper())}\\fR"
        out.append(f".TP\n{names}\n{roff(a.help or '')}")
    return "\n".join(out)


def subcommands(parser, prefix=""):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            seen = set()
            for name, sub in a.choices.items():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                aliases = [n for n, p in a.choices.items() if p is sub and n != name]
                title = prefix + name + (f" (alias {', '.join(aliases)})" if aliases else "")
                yield title, helps.get(name, ""), sub
                yield from subcommands(sub, prefix + name + " ")


def manpage(server):
    prog, summary, desc = DESCRIPTION[server]
    parser = innernet.build_parser(server)
    title = roff(prog.upper())
    parts = [f'.TH {title} 8 "" "innernet.py {innernet.__version__}" "System Administration"',
             ".SH NAME", f"{roff(prog)} \\- {roff(summary)}",
             ".SH SYNOPSIS", f"\\fB{roff(prog)}\\fR [\\fIGLOBAL OPTIONS\\fR] "
             f"\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
             ".SH DESCRIPTION", roff(desc),
             ".SH GLOBAL OPTIONS", options(parser),
             ".PP", "Every command also takes the long forms of these after its name; "
             "they are not repeated below.", ".SH COMMANDS"]
    glob = {o for a in parser._actions for o in a.option_strings}
    for title, text, sub in subcommands(parser):
        parts += [f".SS {roff(title)}", roff(text or ""), options(sub, glob)]
    parts += [".SH FILES",
              ".TP\n/etc/innernet/\\fINETWORK\\fR.conf\nclient configuration (0600)",
              ".TP\n/var/lib/innernet/\\fINETWORK\\fR.json\ncached peers and CIDRs",
              ".TP\n/etc/innernet\\-server/\\fINETWORK\\fR.conf\nserver configuration (0600)",
              ".TP\n/var/lib/innernet\\-server/\\fINETWORK\\fR.db\nserver database (SQLite)",
              ".SH EXIT STATUS", "0 on success, 1 on an error (one line on stderr, "
              "with a hint), 2 for a usage error, 3 when \\fBup \\-\\-daemon\\fR has no "
              "installed network left to sync, 130 when interrupted.",
              ".SH SEE ALSO", "\\fBinnernet\\fR(8), \\fBinnernet\\-server\\fR(8), \\fBwg\\fR(8)"]
    return "\n".join(parts) + "\n"


def main():
    """OUTDIR/NAME.8, and OUTDIR/SHELL/NAME by the names each shell looks for:
    the files dh_installman, dh_bash-completion and dh_install take as they are."""
    out = sys.argv[1]
    for server in (False, True):
        prog = DESCRIPTION[server][0]
        write(os.path.join(out, f"{prog}.8"), manpage(server))
        for shell, name in (("bash", prog), ("zsh", f"_{prog}"), ("fish", f"{prog}.fish")):
            write(os.path.join(out, shell, name), innernet.completion_script(shell, server))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
