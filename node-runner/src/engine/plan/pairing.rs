//! Pairing: a latency, or a pointer stashed at entry (e.g. a file name), needs stash programs
//! at the template's entry points, keyed the same as the main program at the return.

use fathom_common::flags;
use fathom_crds::tenancy::Reach;

use super::{
    Attachment, Role,
    check::Formats,
    draft::Draft,
    not_feasible,
    resolve::{Resolver, infeasible},
    template::Template,
};
use crate::engine::error::EngineError;

impl Draft<'_> {
    /// Every program's attachment: the stash points first when the main program pairs with
    /// them, then the main point. A latency on a probe without an entry/return pair is not
    /// feasible, whatever else was found.
    pub(super) fn attachments(
        &mut self,
        template: &Template,
        formats: &Formats,
        latency: bool,
    ) -> Result<Vec<Attachment>, EngineError> {
        let mut attachments = Vec::new();
        if latency || template.stash_value.is_some() {
            attachments = self.pair(template, formats)?;
        }
        attachments.push(Attachment {
            role: Role::Main,
            point: template.main.clone(),
        });
        Ok(attachments)
    }

    /// The stash programs: what each stash point keys by (and keeps), what the main program
    /// looks it up by.
    fn pair(
        &mut self,
        template: &Template,
        formats: &Formats,
    ) -> Result<Vec<Attachment>, EngineError> {
        let Some((entry_key, exit_key)) = &template.stash_key else {
            return Err(not_feasible(vec![infeasible(
                &self.main.point.label(),
                "latency needs an entry/return pair this probe does not have".into(),
            )]));
        };
        let mut attachments = Vec::new();
        for sp in &template.stash {
            // The stash's key and value are the template's own (a thread id, a field), never
            // shown: no argument count or tenant check applies.
            let r = Resolver {
                point: sp,
                format: formats.get(&sp.label()),
                args: None,
                reach: Reach::Node,
            };
            match r.named(entry_key) {
                Ok((src, _)) => self.stash.key_src = src,
                Err(e) => self.errors.push(infeasible(&sp.label(), e)),
            }
            if let Some(v) = &template.stash_value {
                match r.named(v) {
                    Ok((src, _)) => self.stash.value_src = src,
                    Err(e) => self.errors.push(infeasible(&sp.label(), e)),
                }
            }
            attachments.push(Attachment {
                role: Role::Stash,
                point: sp.clone(),
            });
        }
        match self.main.named(exit_key) {
            Ok((src, _)) => self.stash.exit_key_src = src,
            Err(e) => self.main_error(e),
        }
        self.config.flags |= flags::PAIRED;
        Ok(attachments)
    }
}
