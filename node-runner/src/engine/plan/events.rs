//! Event streaming: the columns of each event (pid, comm, the template's columns, the job's
//! number keys, the latency, the payload) and how the main program fills them.

use fathom_common::{Source, source, strsrc};
use fathom_crds::spec::CheckedEvents;

use super::{
    Column, EventPart, EventPlan, KeyPart, Render,
    draft::Draft,
    template::{EventSource, PayloadSource, Template},
};
use crate::engine::kernel::Kernel;

impl Draft<'_> {
    /// The event columns, after the key `columns` are known (the job's number keys show in
    /// events too).
    pub(super) fn events(
        &mut self,
        ev: &CheckedEvents,
        template: &Template,
        kernel: &Kernel,
        columns: &[Column],
        latency: bool,
    ) -> EventPlan {
        let mut cols: Vec<(String, EventPart)> = vec![
            ("pid".into(), EventPart::Pid),
            ("comm".into(), EventPart::Comm),
        ];
        for (name, src) in &template.event_columns {
            if let Some(part) = self.event_column(src, template, kernel) {
                cols.push((name.clone(), part));
            }
        }
        // Keys the user asked for show in events too.
        for c in columns {
            if let KeyPart::Field(i) = c.part
                && !cols.iter().any(|(n, _)| n == &c.name)
            {
                cols.push((c.name.clone(), EventPart::Field(i, c.render.clone())));
            }
        }
        if latency {
            cols.push(("latency_ns".into(), EventPart::Value(Render::Unsigned)));
        }
        if let Some(p) = &template.payload {
            let name = match p {
                PayloadSource::Field(f) => f.clone(),
                PayloadSource::Stashed => "filename".into(),
            };
            cols.push((name, EventPart::Payload));
            if ev.payload {
                self.payload(p, ev.max_payload_bytes);
            }
        }
        EventPlan {
            last: ev.last as usize,
            columns: cols,
            payload: ev.payload,
        }
    }

    /// One column of the template's: where the main program reads it, or `None` when it
    /// cannot be read here (an error, or a value the template does not name).
    fn event_column(
        &mut self,
        src: &EventSource,
        template: &Template,
        kernel: &Kernel,
    ) -> Option<EventPart> {
        match src {
            EventSource::Ppid => match kernel.task_offsets() {
                Some((parent, tgid)) => {
                    self.config.event_arg = Source {
                        kind: source::PARENT_PID,
                        offset: parent,
                        size: tgid,
                        signed: 0,
                    };
                    Some(EventPart::Arg(Render::Unsigned))
                }
                // Without BTF the parent is looked up in /proc when the event is read.
                None => Some(EventPart::Ppid),
            },
            EventSource::Value => {
                let n = template.event_value.as_ref()?;
                match self.main.named(n) {
                    Ok((src, render)) => {
                        if self.config.value_src.kind == source::NONE {
                            self.config.value_src = src;
                        }
                        Some(EventPart::Value(render))
                    }
                    Err(e) => {
                        self.main_error(e);
                        None
                    }
                }
            }
            // A field slot while one is free, else the event argument.
            EventSource::Named(n) => match self.main.named(n) {
                Ok((src, render)) => {
                    let slot = self.field_slots.len();
                    if slot < 2 {
                        self.field_slots.push(src);
                        Some(EventPart::Field(slot, render))
                    } else {
                        self.config.event_arg = src;
                        Some(EventPart::Arg(render))
                    }
                }
                Err(e) => {
                    self.main_error(e);
                    None
                }
            },
        }
    }

    /// Where the main program copies the string payload from, at most `max_bytes` of it.
    fn payload(&mut self, p: &PayloadSource, max_bytes: u32) {
        match p {
            PayloadSource::Field(f) => match self.main.format.and_then(|fm| fm.field(f)) {
                Some(field) if field.is_data_loc() => {
                    self.config.str_kind = strsrc::TP_DATA_LOC;
                    self.config.str_offset = field.offset;
                }
                Some(field) if field.is_char_pointer() => {
                    self.config.str_kind = strsrc::TP_USER_PTR;
                    self.config.str_offset = field.offset;
                }
                _ => self.main_error(format!("no string field {f:?} in this tracepoint")),
            },
            PayloadSource::Stashed => self.config.str_kind = strsrc::STASHED_USER_PTR,
        }
        self.config.str_max = max_bytes;
    }
}
