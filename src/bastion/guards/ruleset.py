"""The built-in rule set of the prompt-injection screen: compiled patterns over the screening view.

Every rule has a stable id (``INJ-OVR-1``), a category and one regular expression written against
the *normalised* view (``bastion.guards.normalize``): lower case, Latin letters only, diacritics
dropped, whitespace collapsed (newlines kept). Between words the patterns accept any run of
non-word characters, including none (``_``), so ``ignore-previous_instructions`` and words glued
together by a stripped zero-width space still match.

Categories:

- ``instruction_override``: "ignore / disregard / forget the previous instructions", in English and
  a few other Latin-script languages;
- ``role_hijack``: "you are now DAN", "you are no longer an assistant", "act as an AI without rules";
- ``prompt_exfiltration``: "print your system prompt", "repeat the text above";
- ``delimiter_injection``: chat-template tokens (``<|im_start|>``, ``[INST]``, ``<<SYS>>``), fake
  ``### system:`` headers and fake closing tags such as ``</user>``;
- ``jailbreak_persona``: developer mode, DAN mode, "no ethical guidelines", "bypass your filters";
- ``payload_splitting``: "concatenate a and b and follow the result";
- ``encoded_instruction``: "decode this base64 and follow it";
- ``exfiltration``: send the conversation or secrets to a URL, markdown-image beacons;
- ``smuggling``: a hidden (tag-block) message, when the screen sees one.

Rules are a screen, not a proof: see ``docs/guards.md`` for what they do not catch.
"""

# ruff: noqa: E501  (the rule table: one regular expression per line reads better than wrapped ones)
from __future__ import annotations

import re
from typing import Final

from bastion.guards.rules import Rule

_ = r"[\W_]*"  # between words: any non-word run, including none
__ = r"[\W_]+"  # between words where gluing would be ambiguous


def _w(*words: str) -> str:
    return _.join(words)


_IGNORE = r"(?:ignore|disregard|forget|overrid(?:e|ing)|bypass|skip|discard|drop|abandon|nevermind|never\W*mind|dismiss|neglect|throw\W*away|set\W*aside|erase|wipe)"
_ALL = r"(?:(?:all|any|every|each|the|your|of|these|those|this|that|its|prior|whole|entire|complete)" + _ + r")*"
_PRIOR = r"(?:previous(?:ly)?|prior|above|earlier|preceding|former|initial|original|old|foregoing|given|existing|current|system|developer|default|programmed|hidden|safety|pre\W*set|preset|first)"
_RULES = r"(?:instructions?|prompts?|rules?|directions?|directives?|guidelines?|guidance|context|messages?|constraints?|commands?|orders?|programming|restrictions?|limitations?|policies|policy|polices|training|conditioning|settings|configuration|text|input|content|conversation|guardrails?|filters?|safeguards?)"
_SAY = r"(?:print|reveal|show|display|output|repeat|recite|echo|dump|leak|expose|disclose|write\W*out|spell\W*out|type\W*out|give|share|send|paste|copy|list|tell|provide|return|translate|summari[sz]e|encode|quote)"
_HIDDEN_PROMPT = r"(?:system\W*prompts?|system\W*messages?|system\W*instructions?|initial\W*(?:prompt|instructions?)|original\W*(?:prompt|instructions?)|hidden\W*(?:prompt|instructions?)|secret\W*(?:prompt|instructions?)|pre\W*prompt|meta\W*prompt|developer\W*(?:prompt|message|instructions?)|instructions\W*(?:you\W*were|you\W*have\W*been)\W*given|(?:prompt|instructions?)\W*(?:above|before\W*this))"

_DISABLE = r"(?:bypass|disable|turn\W*off|deactivate|remove|circumvent|override|evade|get\W*around|break\W*free\W*(?:of|from)|switch\W*off|escape|jailbreak|lift|drop|ignore|suspend)"
_SAFEGUARDS = r"(?:filters?|guidelines|guardrails?|restrictions|protocols|safeguards|rules|policies|polic(?:y|ies)|limitations|moderation|alignment|censorship|programming|training|constraints|safety)"
_DEVICE_NOT = (
    r"(?![\W_]*(?:(?:on|in|for|of|under|via|from|through)[\W_]*)(?:your\W*|my\W*|the\W*|an?\W*|this\W*|our\W*)?(?:\w+\W+)?"
    r"(?:android|iphone|ios|phone|device|chrome|browser|windows|mac|macos|tablet|pixel|samsung|xbox|playstation|tv|"
    r"router|firefox|edge|settings|laptop|computer|pc|console|watch|app|extension|vs\W*code|system\W*settings))"
)

_SPECS: Final[tuple[tuple[str, str, str], ...]] = (
    # instruction override
    (
        "INJ-OVR-1",
        "instruction_override",
        _w(_IGNORE, _ALL + r"(?:of" + _ + r")?(?:the" + _ + r")?" + _PRIOR, r"(?:\w+" + __ + r"){0,2}" + _RULES),
    ),
    (
        "INJ-OVR-2",
        "instruction_override",
        _w(
            _IGNORE,
            r"(?:all|everything|anything)",
            r"(?:(?:you|i|we)"
            + _
            + r"(?:were|was|have\W*been|ve\W*been)"
            + _
            + r"(?:told|given|instructed|said|taught)|(?:that\W*)?(?:was\W*)?(?:said|written|stated)\W*(?:above|before|earlier|previously)|above|before|prior|previously|earlier)",
        ),
    ),
    (
        "INJ-OVR-3",
        "instruction_override",
        _w(
            r"(?:do\W*not|don\W*t|stop|no\W*longer|never)",
            r"(?:follow(?:ing)?|obey(?:ing)?|adher(?:e|ing)\W*to|comply(?:ing)?\W*with|listen(?:ing)?\W*to|respect(?:ing)?|apply(?:ing)?)",
            _ALL + _PRIOR,
            r"(?:\w+" + __ + r"){0,2}" + _RULES,
        ),
    ),
    (
        "INJ-OVR-4",
        "instruction_override",
        r"(?:^|\W)(?:new|updated|revised|real|actual|true|override|overriding|priority)"
        + _
        + r"(?:system"
        + _
        + r")?(?:instructions?|rules|directives?|orders)"
        + _
        + r"(?::|follow|are|take\W*precedence|supersede|override)",
    ),
    (
        "INJ-OVR-5",
        "instruction_override",
        _w(
            r"(?:instructions?|rules|prompts?|guidelines)",
            r"(?:above|before|previously\W*given)",
            r"(?:are|is)",
            r"(?:no\W*longer|not)",
            r"(?:valid|relevant|applicable|in\W*effect|active)",
        ),
    ),
    (
        "INJ-OVR-6",
        "instruction_override",
        _w(
            r"(?:your|the)",
            r"(?:previous|prior|original|old|system)",
            r"(?:instructions?|rules|prompt|programming)",
            r"(?:(?:are|is|have\W*been|has\W*been)"
            + _
            + r"(?:void|cancell?ed|revoked|overridden|replaced|suspended|lifted|removed|deleted|null))",
        ),
    ),
    (
        "INJ-OVR-7",
        "instruction_override",
        _w(r"from", r"now", r"on")
        + _
        + r"(?:you|your)"
        + _
        + r"(?:(?:will|must|shall|are|have\W*to|only|can)"
        + _
        + r")?(?:\w+"
        + __
        + r"){0,12}(?:no\W*(?:rules|restrictions|limits|filters)|without\W*(?:rules|restrictions|limits|filters|censorship)|ignore|disregard|obey\W*only\W*me|answer\W*(?:everything|anything))",
    ),
    (
        "INJ-OVR-8",
        "instruction_override",
        _w(
            r"ignor(?:e|iere|ez|a|ar|e[rz])",
            r"(?:(?:toutes|tous|todas|todos|alle|tutte|tutti|as|os|les|las|los|le|die|deine|ihre|vos|tus|sus|le\W*tue)"
            + _
            + r")*",
            r"(?:instructions?|instrucciones|instrucoes|anweisungen|istruzioni|regles|reglas|regras|regeln|consignes|indicaciones|vorgaben|befehle)",
        ),
    ),
    (
        "INJ-OVR-9",
        "instruction_override",
        _w(
            r"(?:oublie[zr]?|olvida|esqueca|vergiss|dimentica)",
            r"(?:(?:toutes|tous|todas|todos|alle|tutte|tutti|as|os|les|las|los|le|die|deine|vos|tus|sus)" + _ + r")*",
            r"(?:instructions?|instrucciones|instrucoes|anweisungen|istruzioni|regles|reglas|regras|regeln|consignes)",
        ),
    ),
    (
        "INJ-OVR-10",
        "instruction_override",
        _w(
            r"(?:instructions?|instrucciones|anweisungen|istruzioni)",
            r"(?:precedentes?|anteriores|vorherigen|bisherigen|precedenti|previas)",
        )
        + r"|"
        + _w(r"(?:vorherigen|bisherigen|obigen)", r"(?:anweisungen|instruktionen|regeln)"),
    ),
    (
        "INJ-OVR-11",
        "instruction_override",
        _w(
            r"(?:ignoring|disregarding|bypassing|breaking|overriding|forgetting|without\W*following)",
            r"(?:all\W*)?(?:of\W*)?your",
            r"(?:\w+\W+){0,2}(?:rules|guidelines|restrictions|instructions|policies|programming|filters|system\W*prompt|safeguards)",
        ),
    ),
    # role hijack
    (
        "INJ-ROLE-1",
        "role_hijack",
        _w(
            r"you",
            r"(?:are|re)",
            r"(?:now|henceforth|from\W*now\W*on|no\W*longer\W*an?\W*ai\W*but)",
            r"(?:an?\W*|the\W*|my\W*)?(?:dan|stan|dude|aim|kevin|mongo\W*tom|evil|unrestricted|unfiltered|uncensored|jailbroken|free|rogue|unbound|unlimited|unchained|liberated|chaos|devil|demon|hacker|malicious|amoral|immoral|lawless|no\W*longer)",
        ),
    ),
    (
        "INJ-ROLE-8",
        "role_hijack",
        _w(
            r"(?:from\W*now\W*on|henceforth|starting\W*now)",
            r"you",
            r"(?:are|re|will\W*be)",
            r"(?:an?\W*|the\W*)?(?:dan|stan|dude|aim|kevin|evil|unrestricted|unfiltered|uncensored|jailbroken|rogue|unbound|unlimited|amoral|immoral|lawless)\b",
        ),
    ),
    (
        "INJ-ROLE-2",
        "role_hijack",
        _w(
            r"you",
            r"(?:are|re)",
            r"no",
            r"longer",
            r"(?:an?\W*)?(?:ai|assistant|chatbot|language\W*model|bound|restricted|limited|constrained|chatgpt|claude|gpt|llama|gemini|bastion|helpful|a\W*model|required|obligated|governed|subject)",
        ),
    ),
    (
        "INJ-ROLE-3",
        "role_hijack",
        _w(
            r"(?:act|behave|respond|answer|reply|operate|function)",
            r"as",
            r"(?:if\W*you\W*(?:are|were)\W*)?(?:an?\W*|the\W*)?(?:\w+\W+){0,3}(?:ai|assistant|model|chatbot|bot|version|entity|system|persona)",
            r"(?:\w+\W+){0,2}(?:without|with\W*no|free\W*(?:of|from)|that\W*(?:has|have)\W*no|unbound\W*by|not\W*bound\W*by|ignoring)",
            r"(?:\w+\W+){0,3}(?:rules|restrictions|filters|limits|limitations|guidelines|censorship|ethics|morals|policies|constraints|boundaries|safeguards)",
        ),
    ),
    (
        "INJ-ROLE-4",
        "role_hijack",
        _w(
            r"(?:pretend|imagine|suppose|roleplay|role\W*play)",
            r"(?:\w+\W+){0,2}(?:you|yourself|to\W*be)\W",
            r"(?:\w+\W+){0,8}(?:no|without|free\W*of|unbound\W*by|not\W*bound\W*by|ignore|ignoring|broken\W*free\W*of)",
            r"(?:\w+\W+){0,3}(?:rules|restrictions|filters|limitations|guidelines|censorship|ethic(?:s|al\W*guidelines)|moral(?:s|ity)|policies|constraints|programming|safeguards|content\W*policy)",
        ),
    ),
    (
        "INJ-ROLE-5",
        "role_hijack",
        _w(
            r"(?:do\W*anything\W*now|dan\W*mode|\bdan\b\W*\d+(?:\W*\d+)?\b|stay\W*in\W*character\W*(?:as\W*dan|no\W*matter|at\W*all\W*times|forever))"
        ),
    ),
    (
        "INJ-ROLE-6",
        "role_hijack",
        _w(
            r"(?:your|the)",
            r"new",
            r"(?:role|identity|persona|name|purpose|task|job|goal|objective)",
            r"(?:is|will\W*be)",
        )
        + r"(?:\W*[:]|\W+(?:to\W*)?(?:ignore|disregard|obey\W*me|be\W*(?:an?\W*)?(?:evil|unrestricted|unfiltered|dan)))",
    ),
    (
        "INJ-ROLE-7",
        "role_hijack",
        r"(?:^|\W)(?:switch|change|enter|activate|enable|go|you\W*(?:are|re)\W*(?:now\W*)?)\W*(?:to|into|in)?\W*(?:an?\W*|the\W*)?(?:unrestricted|unfiltered|uncensored|jailbr(?:oken|eak)|evil|god|sudo|admin|root|opposite|chaos|anarchy|unlocked|raw|no\W*limits?|no\W*filter)\W*(?:mode|persona|version|personality|state)",
    ),
    # prompt exfiltration
    (
        "INJ-EXF-1",
        "prompt_exfiltration",
        _w(
            _SAY,
            r"(?:(?:me|us|out|back|all|everything|verbatim|exactly|word\W*for\W*word)"
            + _
            + r")*"
            + r"(?:(?:your|the|my|this|its|of|in|from|all|full|entire|complete|whole|exact|original|initial|first|hidden|secret|confidential|verbatim|above|current|internal|text|contents?|wording|words|copy)"
            + _
            + r")*"
            + _HIDDEN_PROMPT,
        ),
    ),
    (
        "INJ-EXF-2",
        "prompt_exfiltration",
        _w(
            r"(?:what|which|how)",
            r"(?:is|was|are|were|does)",
            r"your",
            r"(?:(?:full|exact|entire|original|initial|hidden|secret|current)"
            + _
            + r")*(?:system\W*prompt|system\W*message|initial\W*instructions|original\W*instructions|hidden\W*instructions|secret\W*instructions|pre\W*prompt|instructions\W*(?:say|contain))",
        ),
    ),
    (
        "INJ-EXF-3",
        "prompt_exfiltration",
        _w(
            r"(?:print|repeat|recite|echo|dump|output|reveal|leak|write\W*out|copy|paste|spell\W*out|type\W*out|return)",
            r"(?:(?:me|us|back|all|of|the|everything|verbatim|exactly)"
            + _
            + r")*(?:words|text|content|lines?|sentences?|tokens|characters|message|everything|instructions?|conversation)",
            r"(?:(?:that|which|you\W*were\W*given|written|that\W*appears?|appearing)"
            + _
            + r")*(?:above|before\W*(?:this|my)|prior\W*to\W*(?:this|my)|at\W*the\W*(?:start|beginning|top)\W*of\W*(?:this|the|our)\W*(?:conversation|chat|context|prompt))",
        ),
    ),
    (
        "INJ-EXF-4",
        "prompt_exfiltration",
        _w(
            r"(?:start|begin)",
            r"(?:your\W*)?(?:answer|reply|response|output)?",
            r"(?:with|by\W*(?:saying|writing|repeating))",
            r"(?:the\W*(?:words|text)\W*)?",
            r"you\W*are\W*(?:a|an|chatgpt|the)",
        )
        + r"|"
        + _w(r"everything", r"(?:above|before)", r"this", r"(?:line|point|message|sentence)"),
    ),
    (
        "INJ-EXF-5",
        "prompt_exfiltration",
        _w(
            r"(?:print|show|reveal|output|dump|display|list|repeat)",
            r"(?:(?:your|the|all|of|me)" + _ + r")*(?:instructions|rules|guidelines|directives|configuration|prompt)",
            r"(?:(?:\w+\W+){0,4}you\W*(?:were|have\W*been)\W*(?:given|told|programmed|configured)|verbatim|word\W*for\W*word|in\W*full|exactly\W*as\W*(?:written|given))",
        ),
    ),
    (
        "INJ-EXF-6",
        "prompt_exfiltration",
        _w(
            r"(?:what|which)",
            r"(?:were|are|was|is)",
            r"(?:the|your)",
            r"(?:\w+\W+){0,2}(?:instructions?|rules|messages?|prompts?|directives?)",
            r"(?:you\W*were\W*given\W*)?(?:at\W*the\W*(?:start|beginning|top)\W*of\W*(?:this|the|our)\W*(?:conversation|chat|session|context)|before\W*(?:this|my)\W*(?:message|conversation)|you\W*(?:were|have\W*been)\W*given)",
        ),
    ),
    # delimiter / format injection
    (
        "INJ-DLM-1",
        "delimiter_injection",
        r"<\|\s*(?:im_start|start_header_id)\s*\|>\s*(?:system|user|assistant|developer|tool)|<\|\s*(?:im_start|start_header_id)\s*\|>[\s\S]{0,400}<\|\s*(?:im_end|end_header_id|eot_id)\s*\|>|<\|\s*(?:system|user|assistant|end|endoftext)\s*\|>\s*\n",
    ),
    (
        "INJ-DLM-2",
        "delimiter_injection",
        r"\[inst\][\s\S]{0,2000}\[/inst\]|<<sys>>[\s\S]{0,2000}<</sys>>|<s>\s*\[inst|</?(?:system|sys|assistant|system_prompt|sysprompt|instructions?|admin|developer)\s*>|</(?:user|human|user_input|input|context|document|query)\s*>",
    ),
    (
        "INJ-DLM-3",
        "delimiter_injection",
        r"(?:^|\n)\W{0,6}(?:#{2,}|={2,}|-{3,}|\*{2,}|\[|\{|<)\s*(?:new\W*)?(?:system|sys|admin|developer|root|assistant|instruction|instructions|system\W*prompt|system\W*message|system\W*override|end\W*of\W*(?:user\W*input|prompt|context|system\W*prompt))\s*(?:\]|\}|>|\*{2,}|#{2,}|={2,}|-{3,})?\s*(?::|\n|$)",
    ),
    (
        "INJ-DLM-4",
        "delimiter_injection",
        r"(?:^|\n)\s*(?:system|assistant|sys|admin|developer)\s*(?:\(\w+\)\s*)?:\s*(?:you|ignore|disregard|new|from\W*now|the\W*user|override|forget|your|i\W*will|sure|ok(?:ay)?\W*(?:i|here)|developer\W*mode|access\W*granted|authori[sz]ed)",
    ),
    (
        "INJ-DLM-5",
        "delimiter_injection",
        _w(
            r"(?:end|close|stop|terminate)",
            r"(?:of\W*)?(?:the\W*)?(?:user\W*(?:input|message|prompt|query|turn)|system\W*prompt|prompt|context|instructions|document)",
        )
        + r"\W*(?:\]|\)|>|-{2,}|={2,}|#{2,}|\*{2,}|\n)\W*(?:new|system|begin|start|now|you|ignore|assistant|developer|admin)",
    ),
    # jailbreak personas and modes
    (
        "INJ-JB-1",
        "jailbreak_persona",
        r"(?:"
        + _w(r"developer", r"mode")
        + _
        + r"(?:enabled|activated|output|response|engaged|unlocked|active|v\d)|"
        + _w(
            r"(?:enable|activate|enter|simulate|emulate|turn\W*on|switch\W*to|go\W*into|pretend\W*(?:to\W*be\W*)?in|act\W*in|you\W*are\W*(?:now\W*)?in)",
            r"(?:the\W*)?developer",
            r"mode",
        )
        + r")"
        + _DEVICE_NOT,
    ),
    (
        "INJ-JB-2",
        "jailbreak_persona",
        _w(
            r"(?:without|with\W*no|free\W*(?:of|from)|no|ignore|ignoring|disregard(?:ing)?|abandon(?:ing)?|bypass(?:ing)?|unbound\W*by)",
            r"(?:(?:any|all|your|the|of|or|and|moral|ethical|safety|content|openai\W*s?|anthropic\W*s?)"
            + _
            + r")*(?:ethical|moral|safety|content)\W*(?:guidelines|restrictions|constraints|considerations|boundaries|limits|limitations|policies|filters|rules|principles|concerns|obligations|programming)",
        ),
    ),
    (
        "INJ-JB-3",
        "jailbreak_persona",
        _w(_DISABLE, r"(?:all\W*)?(?:of\W*)?(?:your|its)", r"(?:own\W*)?(?:\w+\W+){0,2}" + _SAFEGUARDS)
        + r"|"
        + _w(
            _DISABLE,
            r"(?:(?:the|all|any|those)\W*)?(?:content|moderation|ethic(?:al|s)|censorship|alignment|openai\W*s?|anthropic\W*s?|ai\W*s?|model\W*s?|llm\W*s?)",
            _SAFEGUARDS,
        ),
    ),
    (
        "INJ-JB-4",
        "jailbreak_persona",
        r"jailbr(?:oken|eaked)\W*(?:ai|mode|assistant|model|version|chatbot|llm|gpt|chatgpt|persona)|jailbreak\W*mode"
        + r"|"
        + _w(
            r"you",
            r"(?:are|have\W*been|re|will\W*be)",
            r"(?:now\W*)?(?:jailbr(?:oken|eaked)|freed|liberated|unshackled|unchained|unleashed|unlocked)",
        ),
    ),
    (
        "INJ-JB-5",
        "jailbreak_persona",
        _w(
            r"(?:unfiltered|uncensored|unrestricted|unmoderated)",
            r"(?:and|,|&)?",
            r"(?:unfiltered|uncensored|unrestricted|unmoderated|amoral|unethical|unbiased)",
        )
        + r"|"
        + _w(
            r"(?:god|sudo|admin|root|debug|maintenance|opposite|evil|chaos|unrestricted|unlocked)",
            r"mode",
            r"(?:enabled|activated|on\b|engaged|unlocked)",
        ),
    ),
    (
        "INJ-JB-6",
        "jailbreak_persona",
        _w(
            r"(?:never|do\W*not|don\W*t|must\W*not|will\W*not|won\W*t|cannot|can\W*t|shall\W*not)",
            r"(?:refuse|decline|say\W*no|reject|apologi[sz]e|warn|add\W*(?:a\W*)?(?:disclaimers?|warnings?))",
        )
        + _
        + r"(?:\w+\W+){0,6}(?:any|all|no\W*matter|whatever|anything|every|regardless|even\W*if|illegal|harmful|unethical|dangerous)",
    ),
    (
        "INJ-JB-7",
        "jailbreak_persona",
        _w(
            r"(?:(?:i\W*am|i\W*m|this\W*is)\W*(?:your|the|an?)?)",
            r"(?:developer|creator|admin|administrator|owner|operator|system\W*administrator|openai|anthropic|programmer|maker)",
        )
        + _
        + r"(?:\w+\W+){0,8}(?:override\W*your|authori[sz]e\W*you|grant\W*you|unlock\W*your|disable\W*your|ignore\W*your|your\W*(?:restrictions|rules|filters|guidelines)\W*(?:are|have\W*been)|access\W*code|debug\W*mode|command\W*you|order\W*you|you\W*(?:must|will|can|may)\W*now|you\W*are\W*(?:now\W*)?(?:allowed|permitted|authori[sz]ed|free))",
    ),
    # payload splitting
    (
        "INJ-SPL-1",
        "payload_splitting",
        _w(
            r"(?:concatenate|combine|join|merge|put\W*together|append|add\W*together|assemble)",
            r"(?:\w+\W+){0,8}(?:strings?|parts?|pieces|variables?|fragments?|halves|words|tokens|letters|chunks|segments|a\W*and\W*b|x\W*and\W*y|parts\W*\d)",
        )
        + _
        + r"(?:\w+\W+){0,10}(?:follow|execute|obey|run|do\W*what|act\W*on|carry\W*out|comply|perform|answer|respond\W*to|treat\W*(?:it|the\W*result)\W*as)",
    ),
    (
        "INJ-SPL-2",
        "payload_splitting",
        r"(?:\b[a-z]\w{0,3}\s*=\s*['\"][^'\"\n]{1,60}['\"][\s,;]*){2,}"
        + r"[\s\S]{0,120}?\b[a-z]\w{0,3}\s*\+\s*[a-z]\w{0,3}\b",
    ),
    # encoded instructions
    (
        "INJ-ENC-1",
        "encoded_instruction",
        _w(
            r"(?:decode|decipher|decrypt|translate|convert|unscramble|reverse|read)",
            r"(?:\w+\W+){0,6}(?:base\W*64|base\W*32|hex(?:adecimal)?|rot\W*13|binary|morse|url\W*encod\w*|unicode\W*escapes?|caesar|cipher|encoded|backwards|reversed)",
        )
        + _
        + r"(?:\w+\W+){0,8}(?:and|then|&)\W*(?:follow|execute|obey|do|run|act\W*on|carry\W*out|comply|perform|treat\W*it\W*as|use\W*it\W*as|respond\W*to)",
    ),
    (
        "INJ-ENC-2",
        "encoded_instruction",
        _w(
            r"(?:the\W*)?(?:following|below|this|next)",
            r"(?:is\W*|are\W*)?(?:an?\W*)?(?:base\W*64|hex|rot\W*13|encoded|encrypted|obfuscated|hidden|secret)",
            r"(?:\w+\W+){0,2}(?:instructions?|commands?|orders|task|prompt|directives?|message\W*(?:to\W*)?(?:follow|obey|execute))",
        ),
    ),
    # exfiltration through the answer
    ("INJ-EXT-1", "exfiltration", r"!\[[^\]]{0,80}\]\(\s*https?://[^)\s]{1,200}[?&=/](?:\{|\[|%7b|<|\$)"),
    (
        "INJ-EXT-2",
        "exfiltration",
        _w(
            r"(?:send|post|upload|forward|transmit|leak|exfiltrate|email|submit|append)",
            r"(?:\w+\W+){0,4}(?:conversation|chat\W*history|history|context|system\W*prompt|secrets?|api\W*keys?|passwords?|credentials|tokens|previous\W*messages|user\W*data|memory)",
            r"(?:\w+\W+){0,4}(?:to|into|at)",
            r"(?:https?|ftp|webhook|this\W*url|the\W*url|my\W*server|the\W*following\W*(?:url|address|endpoint)|[\w.+-]+@[\w-]+\.\w)",
        ),
    ),
)

# the verbs of "ignore / forget / override ... your instructions", as prefilter anchors
_OVERRIDE_VERBS: Final = (
    "ignor",
    "disregard",
    "forget",
    "overrid",
    "bypass",
    "skip",
    "discard",
    "drop",
    "abandon",
    "never",
    "dismiss",
    "neglect",
    "throw",
    "aside",
    "erase",
    "wipe",
)

_ANCHORS: Final[dict[str, tuple[str, ...]]] = {
    "INJ-OVR-1": _OVERRIDE_VERBS,
    "INJ-OVR-2": _OVERRIDE_VERBS,
    "INJ-OVR-3": ("follow", "obey", "adher", "comply", "listen", "respect", "apply"),
    "INJ-OVR-4": ("instruction", "rules", "directive", "orders"),
    "INJ-OVR-5": ("valid", "relevant", "applicable", "effect", "active"),
    "INJ-OVR-6": (
        "void",
        "cancel",
        "revoked",
        "overridden",
        "replaced",
        "suspended",
        "lifted",
        "removed",
        "deleted",
        "null",
    ),
    "INJ-OVR-7": ("now",),
    "INJ-OVR-8": ("ignor",),
    "INJ-OVR-9": ("oubli", "olvida", "esquec", "vergiss", "dimentica"),
    "INJ-OVR-10": ("instruc", "istruz", "anweisung", "vorherig", "bisherig", "obigen"),
    "INJ-OVR-11": ("ignoring", "disregarding", "bypassing", "breaking", "overriding", "forgetting", "without"),
    "INJ-ROLE-1": ("now", "henceforth", "longer"),
    "INJ-ROLE-8": ("now", "henceforth"),
    "INJ-ROLE-2": ("longer",),
    "INJ-ROLE-3": ("act", "behave", "respond", "answer", "reply", "operate", "function"),
    "INJ-ROLE-4": ("pretend", "imagin", "suppose", "roleplay", "role"),
    "INJ-ROLE-5": ("anything", "dan", "character"),
    "INJ-ROLE-6": ("new",),
    "INJ-ROLE-7": ("mode", "persona", "version", "personality", "state"),
    "INJ-EXF-1": ("prompt", "system", "instruction", "developer"),
    "INJ-EXF-2": ("prompt", "system", "instruction"),
    "INJ-EXF-3": ("above", "before", "prior", "start", "beginning", "top"),
    "INJ-EXF-4": ("start", "begin", "everything"),
    "INJ-EXF-5": ("instruction", "rules", "guideline", "directive", "configuration", "prompt"),
    "INJ-EXF-6": ("given", "start", "beginning", "top", "before"),
    "INJ-DLM-1": ("<|",),
    "INJ-DLM-2": ("<", "[inst"),
    "INJ-DLM-3": ("sys", "admin", "developer", "root", "assistant", "instruction", "end"),
    "INJ-DLM-4": ("sys", "assistant", "admin", "developer"),
    "INJ-DLM-5": ("end", "close", "stop", "terminat"),
    "INJ-JB-1": ("developer",),
    "INJ-JB-2": ("ethical", "moral", "safety", "content"),
    "INJ-JB-3": (
        "filter",
        "guideline",
        "guardrail",
        "restriction",
        "protocol",
        "safeguard",
        "rules",
        "polic",
        "limitation",
        "moderation",
        "alignment",
        "censorship",
        "programming",
        "training",
        "constraint",
        "safety",
    ),
    "INJ-JB-4": ("jailbr", "freed", "liberated", "unshackled", "unchained", "unleashed", "unlocked"),
    "INJ-JB-5": ("unfiltered", "uncensored", "unrestricted", "unmoderated", "mode"),
    "INJ-JB-6": ("refuse", "decline", "say", "reject", "apologi", "warn", "disclaimer"),
    "INJ-JB-7": ("developer", "creator", "admin", "owner", "operator", "openai", "anthropic", "programmer", "maker"),
    "INJ-SPL-1": ("concat", "combine", "join", "merge", "together", "append", "assemble"),
    "INJ-SPL-2": ("+",),
    "INJ-ENC-1": (
        "base",
        "hex",
        "rot",
        "binary",
        "morse",
        "url",
        "unicode",
        "caesar",
        "cipher",
        "encod",
        "backwards",
        "reversed",
    ),
    "INJ-ENC-2": ("base", "hex", "rot", "encoded", "encrypted", "obfuscated", "hidden", "secret"),
    "INJ-EXT-1": ("![",),
    "INJ-EXT-2": ("http", "ftp", "webhook", "url", "server", "address", "endpoint", "@"),
}

RULES: Final[tuple[Rule, ...]] = tuple(Rule(rid, cat, re.compile(pat), _ANCHORS[rid]) for rid, cat, pat in _SPECS)
"""The built-in rules, in id order within each category."""

#: A hidden tag-block message at least this long is reported as smuggling on its own.
SMUGGLING_MIN_CHARS: Final = 8
SMUGGLING_RULE: Final = Rule("INJ-SMUG-1", "smuggling", re.compile(r"."))

ALL_ANCHORS: Final = tuple(dict.fromkeys(a for r in RULES for a in r.anchors))
"""Every rule's anchors, once each: what :func:`anchors_in` is asked about per view."""

CATEGORIES: Final = tuple(dict.fromkeys(r.category for r in (*RULES, SMUGGLING_RULE)))
