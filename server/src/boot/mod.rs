//! Network boot services: DHCP and proxyDHCP, TFTP, router advertisements, HTTP boot.
