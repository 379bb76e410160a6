//! Who may approve a request, and when enough have: segregation of duties
//! as plain functions over the request's record.

use crate::record::approval::{Approval, Approvers, Person, Request};

/// Why a person may not approve (or deny, or revoke) a request.
pub fn barred(request: &Request, person: &Person) -> Option<String> {
    let r = &request.requester;
    if r.human
        .as_ref()
        .is_some_and(|h| h.issuer == person.issuer && h.subject == person.subject)
    {
        return Some(format!(
            "{} started the process that asked: a requester never decides their own request",
            person.subject
        ));
    }
    let owner = r
        .owners
        .iter()
        .find(|o| **o == person.subject || person.groups.contains(o));
    if let Some(o) = owner {
        return Some(format!(
            "{} is an owner of workload `{}` (as `{o}`): owners never decide its requests",
            person.subject, r.workload
        ));
    }
    None
}

/// Whether `person` is one of the approvers `request`'s rule asks for
/// (`break_glass`: one of the break-glass groups instead); why not if not.
pub fn eligible(request: &Request, person: &Person, break_glass: bool) -> Result<(), String> {
    let t = &request.terms;
    let groups: Vec<&String> = match break_glass {
        true => t.break_glass.iter().collect(),
        false => t.approvers.iter().flat_map(|a| &a.groups).collect(),
    };
    if groups.is_empty() && break_glass {
        return Err("break-glass is not configured (approvals.break_glass_groups)".into());
    }
    if person.groups.iter().any(|g| groups.contains(&g)) {
        return Ok(());
    }
    let wanted: Vec<&str> = groups.iter().map(|g| g.as_str()).collect();
    Err(format!(
        "{} is in none of the groups that may {} this request ({}); their token lists: {}",
        person.subject,
        if break_glass {
            "break glass on"
        } else {
            "decide"
        },
        wanted.join(", "),
        if person.groups.is_empty() {
            "no groups".to_owned()
        } else {
            person.groups.join(", ")
        }
    ))
}

/// Whether `person` has already approved `request`.
pub fn counted(request: &Request, person: &Person) -> bool {
    request
        .approvals
        .iter()
        .any(|a| a.person.issuer == person.issuer && a.person.subject == person.subject)
}

/// People break-glass needs: someone besides the requester, and besides
/// the one who broke the glass.
pub const BREAK_GLASS_PEOPLE: usize = 2;

/// Whether the approvals fill every group the rule asks for: each group
/// `count` distinct people who belong to it, a person filling one place
/// only (so one person in two groups does not fill both). Or, by
/// break-glass, [`BREAK_GLASS_PEOPLE`] people of the break-glass groups.
pub fn filled(approvers: &[Approvers], approvals: &[Approval]) -> bool {
    let glass = approvals.iter().filter(|a| a.break_glass).count();
    if glass >= BREAK_GLASS_PEOPLE {
        return true;
    }
    let people: Vec<&Approval> = approvals.iter().filter(|a| !a.break_glass).collect();
    // Places to fill, each a group of approvers.
    let places: Vec<&Approvers> = approvers
        .iter()
        .flat_map(|a| std::iter::repeat_n(a, a.count as usize))
        .collect();
    if places.len() > people.len() {
        return false;
    }
    // Bipartite matching of places to people (augmenting paths; both
    // sides are a handful).
    let fits = |place: &Approvers, who: &Approval| {
        who.person.groups.iter().any(|g| place.groups.contains(g))
    };
    let mut taken: Vec<Option<usize>> = vec![None; people.len()];
    fn place_one(
        p: usize,
        places: &[&Approvers],
        people: &[&Approval],
        taken: &mut [Option<usize>],
        seen: &mut [bool],
        fits: &dyn Fn(&Approvers, &Approval) -> bool,
    ) -> bool {
        for who in 0..people.len() {
            if seen[who] || !fits(places[p], people[who]) {
                continue;
            }
            seen[who] = true;
            let free = match taken[who] {
                None => true,
                Some(other) => place_one(other, places, people, taken, seen, fits),
            };
            if free {
                taken[who] = Some(p);
                return true;
            }
        }
        false
    }
    (0..places.len()).all(|p| {
        let mut seen = vec![false; people.len()];
        place_one(p, &places, &people, &mut taken, &mut seen, &fits)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::approval::Channel;

    fn person(subject: &str, groups: &[&str]) -> Person {
        Person {
            issuer: "https://id.example.org".into(),
            subject: subject.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn approval(subject: &str, groups: &[&str]) -> Approval {
        Approval {
            person: person(subject, groups),
            at: 0,
            comment: None,
            channel: Channel {
                by: "test".into(),
                peer: "-".into(),
            },
            break_glass: false,
        }
    }

    fn groups(spec: &[(&[&str], u32)]) -> Vec<Approvers> {
        spec.iter()
            .map(|(g, count)| Approvers {
                groups: g.iter().map(|g| g.to_string()).collect(),
                count: *count,
            })
            .collect()
    }

    /// Groups combine with AND, and a person fills one place: someone in
    /// both groups does not approve for both.
    #[test]
    fn approvals_fill_groups_with_distinct_people() {
        let two = groups(&[(&["dba"], 1), (&["security"], 1)]);
        assert!(!filled(&two, &[approval("alice", &["dba", "security"])]));
        assert!(filled(
            &two,
            &[
                approval("alice", &["dba", "security"]),
                approval("bob", &["dba"]),
            ]
        ));
        assert!(!filled(
            &two,
            &[approval("bob", &["dba"]), approval("dave", &["dba"])]
        ));
        let pair = groups(&[(&["dba"], 2)]);
        assert!(!filled(&pair, &[approval("bob", &["dba"])]));
        assert!(filled(
            &pair,
            &[approval("bob", &["dba"]), approval("eve", &["dba", "x"])]
        ));
        // The matching moves an earlier placement to make room.
        let either = groups(&[(&["dba", "security"], 1), (&["dba"], 1)]);
        assert!(filled(
            &either,
            &[approval("alice", &["dba"]), approval("sam", &["security"])]
        ));
    }

    /// Break-glass needs two people of the break-glass groups.
    #[test]
    fn break_glass_needs_two_people() {
        let g = groups(&[(&["dba"], 1)]);
        let mut a = approval("oncall1", &["sre"]);
        a.break_glass = true;
        assert!(!filled(&g, std::slice::from_ref(&a)));
        let mut b = approval("oncall2", &["sre"]);
        b.break_glass = true;
        assert!(filled(&g, &[a, b]));
    }
}
